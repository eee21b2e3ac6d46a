"""Prometheus metrics, read from the runtime's plain-int counters at scrape time.

Nothing on the hot path calls prometheus-client: servers, pools and listeners count in plain
attributes, and this module's `Collector` turns them into metric families when Prometheus scrapes
`/metrics`. Names and labels are a contract (issue #5); more may be added, never renamed.

A scrape is read on the event loop and encoded off it. Formatting the exposition of a few hundred
servers takes tens of milliseconds of pure Python, which would stall every connection on the loop
(issue #14: 88 ms for 400 servers); but the live objects belong to the loop, which changes them (and
a reload replaces them) at any time. So `Registry.snapshot()`, on the loop, copies every figure the
metrics need into plain tuples (`Reading`, about 1 ms for 400 servers), and the metric families are
built from that copy and encoded in a thread: nothing outside the loop ever touches a live object.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector as CollectorBase

from lbproxy import __version__, build
from lbproxy.handshake import HANDSHAKE_BOUNDS
from lbproxy.http_proxy import DURATION_BOUNDS
from lbproxy.limits import WAIT_BOUNDS
from lbproxy.pool import AdminState, Pool, Tier

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Listener(Protocol):
    """What metrics read of a listener (HttpListener, TcpListener, or a sum over workers)."""

    name: str
    mode: str  # "http" or "tcp"; the request, response and duration counters are http's
    connections_total: int
    rejected: int
    requests: int
    responses: list[int]
    errors: dict[int, int]
    durations: list[int]
    duration_sum: float

    @property
    def active_connections(self) -> int: ...


class Source(Protocol):
    """What metrics read of the runtime."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def listeners(self) -> Mapping[str, Any]: ...  # Listener-like objects

    @property
    def reloads(self) -> Mapping[str, int]: ...

    @property
    def last_reload_ok(self) -> bool: ...


class ServerReading(NamedTuple):
    """One server's figures, copied on the loop."""

    pool: str
    name: str
    up: bool
    admin: AdminState
    inflight: int
    requests: int
    responses: tuple[int, ...]  # by status class, 1xx to 5xx
    connect_failures: int
    tls_handshakes: int | None  # new TLS connections (None: the pool has no tls)
    tls_resumptions: int
    failures: int
    sent_bytes: int
    received_bytes: int
    checks_success: int
    checks_failure: int
    check_duration: float
    transitions_up: int
    transitions_down: int
    transition_time: float
    weight: float  # live, in units of the configured ratio
    max_connections: int = 0  # 0: no limit


class PoolReading(NamedTuple):
    name: str
    tier: Tier
    servers_up: int
    failovers: int
    retries: int
    depool_refusals: int
    persistence: tuple[int, int, int] | None  # hits, misses, redispatches; None: no persistence
    client_certificate_expiry: float | None = None  # pools.<name>.tls.client_cert: when it expires
    queue: dict[str, Any] | None = None  # servers with max_connections: limits.Queue.numbers()
    hedging: dict[str, Any] | None = None  # pools with hedge: hedging.Hedging.numbers()


class ListenerReading(NamedTuple):
    name: str
    mode: str
    active_connections: int
    connections_total: int
    rejected: int
    requests: int
    responses: tuple[int, ...]  # by status class, 1xx to 5xx
    errors: tuple[tuple[int, int], ...]  # (status, count), by status
    durations: tuple[int, ...]  # per bucket of DURATION_BOUNDS, then +Inf; not cumulative
    duration_sum: float
    routes: tuple[tuple[str, int], ...] = ()  # (route name, requests), in the listener's order
    wrong_protocol: int = 0  # TLS handshakes sent to a plain http listener
    certificates: tuple[tuple[str, float], ...] = ()  # (name, expiry as a Unix time), TLS listeners
    handshakes: dict[str, Any] | None = None  # TLS listeners: handshake.Handshakes.numbers()
    rate_limited: int | None = None  # listeners with a rate_limit: requests refused


@dataclass(frozen=True, slots=True)
class Reading:
    """Every figure lbproxy's metrics show, copied from the live objects at one moment of the loop."""

    servers: list[ServerReading]
    pools: list[PoolReading]
    listeners: list[ListenerReading]
    reloads: dict[str, int]
    last_reload_ok: bool
    worker_requests: dict[str, int] | None  # with --workers: the supervisor's view
    worker_restarts: int
    cluster: tuple[bool, int, int] | None = None  # with a cluster block: connected, nodes, servers seen unalike


def read(source: Source) -> Reading:
    """Copy what the metrics need from the live objects. On the event loop only: it owns them."""
    servers = [
        ServerReading(
            pool.name,
            server.name,
            server.up,
            server.admin,
            server.inflight,
            server.requests,
            tuple(server.responses[1:6]),
            server.connect_failures,
            server.tls_handshakes if server.endpoint.tls is not None else None,
            server.tls_resumptions,
            server.failures,
            server.sent_bytes,
            server.received_bytes,
            server.checks[1],
            server.checks[0],
            server.check_duration,
            server.transitions["up"],
            server.transitions["down"],
            server.transition_time,
            server.weight / server.full_weight * server.ratio,
            server.max_connections,
        )
        for pool in source.pools.values()
        for server in pool.servers
    ]
    pools = [
        PoolReading(
            pool.name,
            pool.tier,
            sum(1 for server in pool.servers if server.up),
            pool.failovers,
            pool.retried,
            pool.depool_refusals,
            _persistence(pool),
            _client_expiry(pool),
            pool.queue.numbers() if pool.queue is not None else None,
            pool.hedging.numbers() if pool.hedging is not None else None,
        )
        for pool in source.pools.values()
    ]
    listeners = [
        ListenerReading(
            listener.name,
            listener.mode,
            listener.active_connections,
            listener.connections_total,
            listener.rejected,
            listener.requests,
            tuple(listener.responses[1:6]),
            tuple(sorted(listener.errors.items())),
            tuple(listener.durations),
            listener.duration_sum,
            tuple(listener.route_counts()),
            listener.wrong_protocol,
            tuple(listener.certificates),
            listener.handshakes.numbers() if listener.handshakes is not None else None,
            listener.rate_limited,
        )
        if listener.mode == "http"
        else ListenerReading(
            listener.name,
            listener.mode,
            listener.active_connections,
            listener.connections_total,
            listener.rejected,
            0,
            (),
            (),
            (),
            0.0,
        )
        for listener in source.listeners.values()
    ]
    workers: Mapping[str, int] | None = getattr(source, "worker_requests", None)
    return Reading(
        servers,
        pools,
        listeners,
        {result: source.reloads.get(result, 0) for result in ("success", "failure")},
        source.last_reload_ok,
        dict(workers) if workers is not None else None,
        getattr(source, "worker_restarts", 0),
        _cluster(getattr(source, "cluster", None)),
    )


def _cluster(cluster: Any) -> tuple[bool, int, int] | None:
    return (cluster.connected, len(cluster.nodes), len(cluster.disagreements())) if cluster is not None else None


def _client_expiry(pool: Pool) -> float | None:
    settings = pool.tls_settings
    expiry = settings.client_expiry if settings is not None else None
    return expiry.timestamp() if expiry is not None else None


def _persistence(pool: Pool) -> tuple[int, int, int] | None:
    persistence = pool.persistence
    if persistence is None:
        return None
    return (persistence.hits, persistence.misses, persistence.redispatches)


def families(reading: Reading) -> Iterator[Metric]:
    """Every lbproxy metric family, built from a `Reading`: plain code, safe in any thread."""
    yield from _servers(reading.servers)
    yield from _pools(reading.pools)
    yield from _listeners(reading.listeners)
    reloads = CounterMetricFamily("lbproxy_config_reloads", "Config reloads, by result.", labels=["result"])
    for result in ("success", "failure"):
        reloads.add_metric([result], reading.reloads[result])
    yield reloads
    last = GaugeMetricFamily(
        "lbproxy_config_last_reload_successful",
        "1 when the last reload was applied (or none was tried), 0 when it was refused.",
    )
    last.add_metric([], 1 if reading.last_reload_ok else 0)
    yield last
    running = GaugeMetricFamily(
        "lbproxy_build_info",
        "Always 1: the version of lbproxy and its build (mypyc or pure).",
        labels=["version", "build"],
    )
    running.add_metric([__version__, build.RUNNING], 1)
    yield running
    if reading.cluster is not None:
        connected = GaugeMetricFamily(
            "lbproxy_cluster_connected", "1 while this node reaches etcd (cluster block); 0: it serves alone."
        )
        connected.add_metric([], 1 if reading.cluster[0] else 0)
        nodes = GaugeMetricFamily("lbproxy_cluster_nodes", "The lbproxy nodes this node sees in the fleet.")
        nodes.add_metric([], reading.cluster[1])
        unalike = GaugeMetricFamily(
            "lbproxy_cluster_health_disagreements",
            "Servers the nodes of the fleet do not see alike (up on some, down on others): a network path.",
        )
        unalike.add_metric([], reading.cluster[2])
        yield from (connected, nodes, unalike)
    if reading.worker_requests is not None:
        per_worker = CounterMetricFamily(
            "lbproxy_worker_requests", "Requests each worker process received.", labels=["worker"]
        )
        for worker, count in reading.worker_requests.items():
            per_worker.add_metric([worker], count)
        restarts = CounterMetricFamily("lbproxy_worker_restarts", "Worker processes restarted after dying.")
        restarts.add_metric([], reading.worker_restarts)
        yield from (per_worker, restarts)


def _servers(servers: list[ServerReading]) -> Iterator[Metric]:
    labels = ["pool", "server"]
    up = GaugeMetricFamily("lbproxy_server_up", "1 when the server's health state is up.", labels=labels)
    admin = GaugeMetricFamily(
        "lbproxy_server_admin_state", "1 for the server's current admin state.", labels=[*labels, "state"]
    )
    active = GaugeMetricFamily(
        "lbproxy_server_active_connections", "Requests (http) or connections (tcp) in flight.", labels=labels
    )
    connections = CounterMetricFamily(
        "lbproxy_server_connections", "Requests (http) or connections (tcp) sent to the server.", labels=labels
    )
    responses = CounterMetricFamily(
        "lbproxy_server_responses", "Responses from the server, by status class.", labels=[*labels, "code"]
    )
    connect_failures = CounterMetricFamily(
        "lbproxy_server_connect_failures", "Connections to the server that could not be opened.", labels=labels
    )
    failures = CounterMetricFamily(
        "lbproxy_server_failures", "Resets, timeouts and invalid responses on open connections.", labels=labels
    )
    sent = CounterMetricFamily("lbproxy_server_sent_bytes", "Bytes lbproxy sent to the server.", labels=labels)
    received = CounterMetricFamily(
        "lbproxy_server_received_bytes", "Bytes lbproxy received from the server.", labels=labels
    )
    checks = CounterMetricFamily(
        "lbproxy_server_health_checks", "Health probes, by result.", labels=[*labels, "result"]
    )
    duration = GaugeMetricFamily(
        "lbproxy_server_health_check_duration_seconds", "How long the last health probe took.", labels=labels
    )
    transitions = CounterMetricFamily(
        "lbproxy_server_transitions", "Health state changes, by the state changed to.", labels=[*labels, "to"]
    )
    last = GaugeMetricFamily(
        "lbproxy_server_last_transition_timestamp_seconds",
        "When the server last changed health state (Unix time; 0 never).",
        labels=labels,
    )
    weight = GaugeMetricFamily(
        "lbproxy_server_weight", "The live weight, in units of the configured ratio.", labels=labels
    )
    handshakes = CounterMetricFamily(
        "lbproxy_server_tls_handshakes",
        "New TLS connections to the server (pools with tls), resumed or not.",
        labels=labels,
    )
    resumptions = CounterMetricFamily(
        "lbproxy_server_tls_resumptions",
        "New TLS connections to the server that resumed a session instead of a full handshake.",
        labels=labels,
    )
    limits = GaugeMetricFamily(
        "lbproxy_server_max_connections",
        "The server's max_connections: requests (http) or connections (tcp) at once (servers with one).",
        labels=labels,
    )
    for server in servers:
        names = [server.pool, server.name]
        if server.max_connections:
            limits.add_metric(names, server.max_connections)
        if server.tls_handshakes is not None:
            handshakes.add_metric(names, server.tls_handshakes)
            resumptions.add_metric(names, server.tls_resumptions)
        up.add_metric(names, 1 if server.up else 0)
        for state in AdminState:
            admin.add_metric([*names, state.value], 1 if server.admin is state else 0)
        active.add_metric(names, server.inflight)
        connections.add_metric(names, server.requests)
        for code, count in zip(CLASSES, server.responses, strict=True):
            responses.add_metric([*names, code], count)
        connect_failures.add_metric(names, server.connect_failures)
        failures.add_metric(names, server.failures)
        sent.add_metric(names, server.sent_bytes)
        received.add_metric(names, server.received_bytes)
        checks.add_metric([*names, "success"], server.checks_success)
        checks.add_metric([*names, "failure"], server.checks_failure)
        duration.add_metric(names, server.check_duration)
        transitions.add_metric([*names, "up"], server.transitions_up)
        transitions.add_metric([*names, "down"], server.transitions_down)
        last.add_metric(names, server.transition_time)
        weight.add_metric(names, server.weight)
    yield from (up, admin, active, connections, responses, connect_failures, failures, sent, received)
    yield from (checks, duration, transitions, last, weight, handshakes, resumptions, limits)


def _pools(pools: list[PoolReading]) -> Iterator[Metric]:
    servers_up = GaugeMetricFamily("lbproxy_pool_servers_up", "Servers of the pool that are up.", labels=["pool"])
    failovers = CounterMetricFamily(
        "lbproxy_pool_failovers",
        "Times the pool's new requests moved to a backup tier: its backup servers or its backup pool.",
        labels=["pool"],
    )
    retries = CounterMetricFamily(
        "lbproxy_pool_retries", "Requests sent again to another server of the pool.", labels=["pool"]
    )
    refusals = CounterMetricFamily(
        "lbproxy_pool_depool_refusals",
        "Servers the depool guard kept in rotation although their probes failed.",
        labels=["pool"],
    )
    tiers = GaugeMetricFamily(
        "lbproxy_pool_tier",
        "Where the pool's new requests go: 1 for the tier in use (primaries, primaries+backups, backups,"
        " backup_pool, none: 503 or the maintenance page).",
        labels=["pool", "tier"],
    )
    hits = CounterMetricFamily(
        "lbproxy_pool_persistence_hits", "Requests whose persistence key led to its server.", labels=["pool"]
    )
    misses = CounterMetricFamily(
        "lbproxy_pool_persistence_misses",
        "Requests with no persistence key, or a cookie naming no server of the pool: balanced by the policy.",
        labels=["pool"],
    )
    redispatches = CounterMetricFamily(
        "lbproxy_pool_persistence_redispatches",
        "Requests whose persisted server could not take them (down, disabled, failed): sent to another.",
        labels=["pool"],
    )
    client_expiry = GaugeMetricFamily(
        "lbproxy_pool_tls_client_certificate_expiry_timestamp_seconds",
        "When the client certificate lbproxy presents to the pool's servers expires (Unix time).",
        labels=["pool"],
    )
    queued = GaugeMetricFamily(
        "lbproxy_pool_queue_length", "Requests (tcp: connections) waiting for a server's slot.", labels=["pool"]
    )
    queue_max = GaugeMetricFamily("lbproxy_pool_queue_max", "The queue's max_size.", labels=["pool"])
    waits = HistogramMetricFamily(
        "lbproxy_pool_queue_wait_seconds", "How long requests that got a slot waited for it.", labels=["pool"]
    )
    rejections = CounterMetricFamily(
        "lbproxy_pool_queue_rejections",
        "Requests refused by the queue (503), by reason: full, or timeout.",
        labels=["pool", "reason"],
    )
    hedges = CounterMetricFamily(
        "lbproxy_pool_hedges",
        "Hedged requests by outcome: won (the second server answered first), lost (the first did), "
        "budget (max_extra spent: not hedged), unavailable (no other server had room).",
        labels=["pool", "result"],
    )
    hedge_after = GaugeMetricFamily(
        "lbproxy_pool_hedge_after_seconds",
        "How long a request waits for a first byte before it is hedged (fixed, or the pool's p99).",
        labels=["pool"],
    )
    for pool in pools:
        if pool.hedging is not None:
            for result, count in pool.hedging["results"].items():
                hedges.add_metric([pool.name, result], count)
            hedge_after.add_metric([pool.name], pool.hedging["after"])
        if pool.queue is not None:
            numbers = pool.queue
            queued.add_metric([pool.name], numbers["length"])
            queue_max.add_metric([pool.name], numbers["max_size"])
            waits.add_metric([pool.name], _cumulative(WAIT_BOUNDS, numbers["waits"]), numbers["wait_sum"])
            for reason, count in numbers["rejections"].items():
                rejections.add_metric([pool.name, reason], count)
        if pool.client_certificate_expiry is not None:
            client_expiry.add_metric([pool.name], pool.client_certificate_expiry)
        if pool.persistence is not None:
            hits.add_metric([pool.name], pool.persistence[0])
            misses.add_metric([pool.name], pool.persistence[1])
            redispatches.add_metric([pool.name], pool.persistence[2])
        for tier in Tier:
            tiers.add_metric([pool.name, tier.value], 1 if pool.tier is tier else 0)
        servers_up.add_metric([pool.name], pool.servers_up)
        failovers.add_metric([pool.name], pool.failovers)
        retries.add_metric([pool.name], pool.retries)
        refusals.add_metric([pool.name], pool.depool_refusals)
    yield from (servers_up, tiers, failovers, retries, refusals, hits, misses, redispatches, client_expiry)
    yield from (queued, queue_max, waits, rejections, hedges, hedge_after)


def _listeners(listeners: list[ListenerReading]) -> Iterator[Metric]:
    labels = ["listener"]
    active = GaugeMetricFamily("lbproxy_listener_active_connections", "Client connections open.", labels=labels)
    accepted = CounterMetricFamily("lbproxy_listener_connections", "Client connections accepted.", labels=labels)
    rejected = CounterMetricFamily(
        "lbproxy_listener_rejected_connections", "Client connections refused over max_connections.", labels=labels
    )
    requests = CounterMetricFamily("lbproxy_listener_requests", "Requests received.", labels=labels)
    responses = CounterMetricFamily(
        "lbproxy_listener_responses", "Responses sent, by status class.", labels=[*labels, "code"]
    )
    errors = CounterMetricFamily(
        "lbproxy_listener_errors", "Responses lbproxy generated itself, by status.", labels=[*labels, "status"]
    )
    duration = HistogramMetricFamily(
        "lbproxy_listener_request_duration_seconds",
        "From a request's head to the end of its response.",
        labels=labels,
    )
    routes = CounterMetricFamily(
        "lbproxy_route_requests", "Requests a route matched (a deny's too), by its name.", labels=[*labels, "route"]
    )
    expiry = GaugeMetricFamily(
        "lbproxy_tls_certificate_expiry_timestamp_seconds",
        "When the certificate a TLS listener serves for a name expires (Unix time).",
        labels=[*labels, "name"],
    )
    wrong_protocol = CounterMetricFamily(
        "lbproxy_listener_wrong_protocol",
        "Connections that sent a TLS handshake to a plain HTTP listener: closed at once.",
        labels=labels,
    )
    handshakes = CounterMetricFamily(
        "lbproxy_listener_tls_handshakes",
        "TLS handshakes by how they ended: ok, or why not (no_shared_cipher, protocol_version, ...).",
        labels=[*labels, "result"],
    )
    versions = CounterMetricFamily(
        "lbproxy_listener_tls_versions", "Finished TLS handshakes by the version agreed.", labels=[*labels, "version"]
    )
    resumed = CounterMetricFamily(
        "lbproxy_listener_tls_resumed", "Finished TLS handshakes that resumed a session.", labels=labels
    )
    handshake_time = HistogramMetricFamily(
        "lbproxy_listener_tls_handshake_duration_seconds",
        "From a TLS connection's accept to the end of its handshake (finished ones).",
        labels=labels,
    )
    limited = CounterMetricFamily(
        "lbproxy_listener_rate_limited",
        "Requests refused because their client was over the listener's rate_limit.",
        labels=labels,
    )
    for listener in listeners:
        name = [listener.name]
        if listener.rate_limited is not None:
            limited.add_metric(name, listener.rate_limited)
        if listener.handshakes is not None:
            numbers = listener.handshakes
            for result, count in numbers["results"].items():
                handshakes.add_metric([*name, result], count)
            for version, count in sorted(numbers["versions"].items()):
                versions.add_metric([*name, version], count)
            resumed.add_metric(name, numbers["resumed"])
            handshake_time.add_metric(
                name, _cumulative(HANDSHAKE_BOUNDS, numbers["durations"]), numbers["duration_sum"]
            )
        for route, count in listener.routes:
            routes.add_metric([*name, route], count)
        active.add_metric(name, listener.active_connections)
        accepted.add_metric(name, listener.connections_total)
        rejected.add_metric(name, listener.rejected)
        if listener.mode != "http":
            continue  # tcp: connections are the unit, no requests
        requests.add_metric(name, listener.requests)
        wrong_protocol.add_metric(name, listener.wrong_protocol)
        for served, expires in listener.certificates:
            expiry.add_metric([*name, served], expires)
        for code, count in zip(CLASSES, listener.responses, strict=True):
            responses.add_metric([*name, code], count)
        for status, count in listener.errors:
            errors.add_metric([*name, str(status)], count)
        duration.add_metric(name, _cumulative(DURATION_BOUNDS, listener.durations), listener.duration_sum)
    yield from (active, accepted, rejected, requests, responses, errors, duration, routes, wrong_protocol, expiry)
    yield from (handshakes, versions, resumed, handshake_time, limited)


def _cumulative(bounds: tuple[float, ...], counts: Sequence[int]) -> list[tuple[str, float]]:
    """A histogram's buckets as Prometheus wants them (cumulative, by upper bound) from per-bucket counts."""
    total = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return buckets


class Collector(CollectorBase):
    """lbproxy's metric families, read from the runtime's live objects.

    `collect()` reads and builds at once (for a caller on the loop); `snapshot()` reads now, on the
    loop, and returns a collector that builds the families from that copy wherever it runs.
    """

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return families(read(self.source))

    def snapshot(self) -> CollectorBase:
        return Snapshot(read(self.source))


class Snapshot(CollectorBase):
    """The metric families of one `Reading`: no live object in sight, so any thread may collect it."""

    def __init__(self, reading: Reading) -> None:
        self.reading = reading

    def collect(self) -> Iterator[Metric]:
        return families(self.reading)


@runtime_checkable
class Live(Protocol):
    """A collector of figures the event loop owns: `snapshot()`, on the loop, copies them into a
    collector that another thread may collect."""

    def snapshot(self) -> CollectorBase: ...


class Registry(CollectorRegistry):
    """lbproxy's registry. Collect it on the event loop, or take a `snapshot()` there and encode that
    in a thread: its live collectors are read at that moment; the others (the process's CPU, memory
    and descriptors, read from /proc) are thread-safe and read when the snapshot is encoded."""

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self._collectors: list[CollectorBase] = []

    def register(self, collector: CollectorBase) -> None:
        super().register(collector)
        self._collectors.append(collector)

    def unregister(self, collector: CollectorBase) -> None:
        super().unregister(collector)
        self._collectors.remove(collector)

    def snapshot(self) -> CollectorRegistry:
        """A registry with this one's metrics, the live ones as they are now. On the event loop only."""
        frozen = CollectorRegistry(auto_describe=False)
        for collector in self._collectors:
            frozen.register(collector.snapshot() if isinstance(collector, Live) else collector)
        return frozen


def registry(source: Source) -> Registry:
    """A registry with lbproxy's metrics and the process's (CPU, memory, file descriptors)."""
    registry = Registry()
    registry.register(Collector(source))
    ProcessCollector(registry=registry)
    return registry
