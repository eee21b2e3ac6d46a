"""Prometheus metrics, read from the runtime's plain-int counters at scrape time.

Nothing on the hot path calls prometheus-client: servers, pools and listeners count in plain
attributes, and this module's `Collector` turns them into metric families when Prometheus scrapes
`/metrics`. Names and labels are a contract (issue #5); more may be added, never renamed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector as CollectorBase

from lbproxy.http_proxy import DURATION_BOUNDS
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


class Collector(CollectorBase):
    """Builds every lbproxy metric family from the runtime's objects, once per scrape."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from self._servers()
        yield from self._pools()
        yield from self._listeners()
        reloads = CounterMetricFamily("lbproxy_config_reloads", "Config reloads, by result.", labels=["result"])
        for result in ("success", "failure"):
            reloads.add_metric([result], self.source.reloads.get(result, 0))
        yield reloads
        last = GaugeMetricFamily(
            "lbproxy_config_last_reload_successful",
            "1 when the last reload was applied (or none was tried), 0 when it was refused.",
        )
        last.add_metric([], 1 if self.source.last_reload_ok else 0)
        yield last
        workers: Mapping[str, int] | None = getattr(self.source, "worker_requests", None)
        if workers is not None:  # with --workers: the supervisor's view
            per_worker = CounterMetricFamily(
                "lbproxy_worker_requests", "Requests each worker process received.", labels=["worker"]
            )
            for worker, count in workers.items():
                per_worker.add_metric([worker], count)
            restarts = CounterMetricFamily("lbproxy_worker_restarts", "Worker processes restarted after dying.")
            restarts.add_metric([], getattr(self.source, "worker_restarts", 0))
            yield from (per_worker, restarts)

    def _servers(self) -> Iterator[Metric]:
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
        for pool in self.source.pools.values():
            for server in pool.servers:
                names = [pool.name, server.name]
                up.add_metric(names, 1 if server.up else 0)
                for state in AdminState:
                    admin.add_metric([*names, state.value], 1 if server.admin is state else 0)
                active.add_metric(names, server.inflight)
                connections.add_metric(names, server.requests)
                for index, code in enumerate(CLASSES, start=1):
                    responses.add_metric([*names, code], server.responses[index])
                connect_failures.add_metric(names, server.connect_failures)
                failures.add_metric(names, server.failures)
                sent.add_metric(names, server.sent_bytes)
                received.add_metric(names, server.received_bytes)
                checks.add_metric([*names, "success"], server.checks[1])
                checks.add_metric([*names, "failure"], server.checks[0])
                duration.add_metric(names, server.check_duration)
                transitions.add_metric([*names, "up"], server.transitions["up"])
                transitions.add_metric([*names, "down"], server.transitions["down"])
                last.add_metric(names, server.transition_time)
                weight.add_metric(names, server.weight / server.full_weight * server.ratio)
        yield from (up, admin, active, connections, responses, connect_failures, failures, sent, received)
        yield from (checks, duration, transitions, last, weight)

    def _pools(self) -> Iterator[Metric]:
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
        for pool in self.source.pools.values():
            for tier in Tier:
                tiers.add_metric([pool.name, tier.value], 1 if pool.tier is tier else 0)
            servers_up.add_metric([pool.name], sum(1 for server in pool.servers if server.up))
            failovers.add_metric([pool.name], pool.failovers)
            retries.add_metric([pool.name], pool.retried)
            refusals.add_metric([pool.name], pool.depool_refusals)
        yield from (servers_up, tiers, failovers, retries, refusals)

    def _listeners(self) -> Iterator[Metric]:
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
        for listener in self.source.listeners.values():
            name = [listener.name]
            active.add_metric(name, listener.active_connections)
            accepted.add_metric(name, listener.connections_total)
            rejected.add_metric(name, listener.rejected)
            if listener.mode != "http":
                continue  # tcp: connections are the unit, no requests
            requests.add_metric(name, listener.requests)
            for index, code in enumerate(CLASSES, start=1):
                responses.add_metric([*name, code], listener.responses[index])
            for status, count in sorted(listener.errors.items()):
                errors.add_metric([*name, str(status)], count)
            cumulative = 0
            buckets = []
            for bound, count in zip((*DURATION_BOUNDS, float("inf")), listener.durations, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            duration.add_metric(name, buckets, listener.duration_sum)
        yield from (active, accepted, rejected, requests, responses, errors, duration)


def registry(source: Source) -> CollectorRegistry:
    """A registry with lbproxy's metrics and the process's (CPU, memory, file descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(source))
    ProcessCollector(registry=registry)
    return registry
