"""Servers, their state, and pools that pick one of them per request or connection.

A `Server` carries what a load balancer knows of one front-end: its address, configured ratio and
live weight, health state (up/down, with the last check and transition), admin state
(enabled/draining/disabled), in-flight count and plain-int counters that metrics read at scrape time.
A `Pool` owns its servers and one policy per priority group (primaries, then `backup: true` servers)
and knows its backup pool; every state change goes through the pool's methods so that the policies
hear of it. The failover order lives here: primaries, backups (or both once fewer than `min_up`
primaries are left), then the backup pool. This module knows nothing of sockets or YAML beyond the
frozen config objects it is built from.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Collection

from lbproxy.balancing import Policy, make_policy
from lbproxy.config import Address, PoolConfig, ServerConfig
from lbproxy.hedging import Hedging
from lbproxy.limits import Queue
from lbproxy.persistence import COOKIE, Persistence
from lbproxy.tls import UpstreamTls
from lbproxy.upstream import Endpoint

log = logging.getLogger("lbproxy.pool")

# Live weights are kept in hundredths of a ratio unit, so that a percentage reported by a probe, or a
# slow start's ramp, is exact even for ratio 1. Policies only compare weights, so the scale is free.
WEIGHT_SCALE = 100


class Tier(enum.Enum):
    """Where a pool's new requests go: its failover order, one step at a time."""

    PRIMARIES = "primaries"
    WITH_BACKUPS = "primaries+backups"  # fewer than min_up primaries: the backups serve beside them
    BACKUPS = "backups"
    BACKUP_POOL = "backup_pool"
    NONE = "none"  # the maintenance page, or 503

    @property
    def failed_over(self) -> bool:
        return self in (Tier.WITH_BACKUPS, Tier.BACKUPS, Tier.BACKUP_POOL)


class AdminState(enum.Enum):
    ENABLED = "enabled"
    DRAINING = "draining"  # no new requests; in-flight ones finish
    DISABLED = "disabled"  # as draining, and what remains is cut after the pool's disable_grace


class Server:
    """One front-end server of a pool. Hashable by identity: policies key their tables on it."""

    __slots__ = (
        "name",
        "address",
        "ratio",
        "full_weight",
        "backup",
        "pool",
        "up",
        "admin",
        "weight",
        "reported",
        "ramp_until",
        "ramp_credit",
        "guarded",
        "admin_time",
        "inflight",
        "consecutive_failures",
        "check_ok",
        "check_reason",
        "check_time",
        "check_duration",
        "checks",
        "transition_reason",
        "transition_time",
        "transitions",
        "requests",
        "responses",
        "connect_failures",
        "tls_handshakes",
        "tls_resumptions",
        "failures",
        "sent_bytes",
        "received_bytes",
        "endpoint",
        "max_connections",
        "__weakref__",
    )

    def __init__(self, config: ServerConfig, pool: Pool) -> None:
        self.name = config.name
        self.address: Address = config.address
        self.ratio = config.ratio
        self.full_weight = config.ratio * WEIGHT_SCALE  # the live weight at full share, read per pick
        self.backup = config.backup
        self.max_connections = config.max_connections or 0  # 0: no limit
        self.pool = pool
        self.up = True
        self.admin = AdminState.ENABLED
        self.admin_time = 0.0  # when the admin state last changed (Unix time; 0: never)
        self.weight = config.ratio * WEIGHT_SCALE  # live weight; see WEIGHT_SCALE
        self.reported = 100  # the last percentage a dynamic_ratio probe reported
        self.ramp_until = 0.0  # slow start: the monotonic time the ramp ends
        self.ramp_credit = 0.0  # slow start in a rotation: turns accrue in fractions
        self.guarded = False  # the depool guard keeps it up (logged once, until its state changes)
        self.inflight = 0
        self.consecutive_failures = 0  # as seen by real traffic, for passive detection
        # The last health check, for the API: result, reason, wall time, seconds it took.
        self.check_ok: bool | None = None
        self.check_reason = ""
        self.check_time = 0.0
        self.check_duration = 0.0
        self.checks = [0, 0]  # [failures, successes]
        self.transition_reason = ""
        self.transition_time = 0.0
        self.transitions = {"up": 0, "down": 0}
        # Counters, read by metrics at scrape time: plain ints, bumped on the hot path at no cost.
        self.requests = 0  # requests (http) or connections (tcp) sent, ever
        self.responses = [0] * 6  # by status class: [1] is 1xx ... [5] is 5xx
        self.connect_failures = 0
        self.tls_handshakes = 0  # pools with tls: new connections to the server (each a handshake)
        self.tls_resumptions = 0  # ... of which resumed a session
        self.failures = 0  # resets, timeouts and garbage seen on established connections
        self.sent_bytes = 0
        self.received_bytes = 0
        self.endpoint = _endpoint(config, pool)  # `reach` resolves the name

    def reach(self, host: str) -> None:
        """Connections go to `host`, the address the control plane resolved the server's name to."""
        self.endpoint = self.endpoint._replace(host=host)

    def reconfigure(self, config: ServerConfig, pool: Pool) -> Server:
        """Take a reloaded config, keeping state and counters; returns self.

        Called only by `Pool.take_over`, at the commit of a reload: a reload that fails never got here,
        so there is nothing to undo.
        """
        if config.address != self.address:
            self.endpoint = _endpoint(config, pool)
        else:
            fresh = _endpoint(config, pool)
            if fresh.tls is not self.endpoint.tls:  # TLS to the servers turned on, off, or changed
                self.endpoint = fresh._replace(host=self.endpoint.host)
        self.address = config.address
        if config.ratio != self.ratio:
            self.weight = self.weight * config.ratio // self.ratio
        self.ratio = config.ratio
        self.full_weight = config.ratio * WEIGHT_SCALE
        self.backup = config.backup
        self.max_connections = config.max_connections or 0
        self.pool = pool
        return self

    @property
    def available(self) -> bool:
        """Whether a new request or connection may go to this server."""
        return self.up and self.admin is AdminState.ENABLED and self.weight > 0

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.address} up={self.up} admin={self.admin.value} w={self.weight}>"


class Pool:
    """The servers of one pool, the policies that choose among them, and the failover order."""

    __slots__ = (
        "name",
        "policy_name",
        "retries",
        "connect_timeout",
        "response_timeout",
        "tls_settings",
        "tls",
        "servers",
        "by_name",
        "backup_pool",
        "min_up",
        "passive_failures",
        "passive_5xx",
        "max_down_fraction",
        "slow_start",
        "disable_grace",
        "failovers",
        "tier",
        "fronted",
        "retried",
        "depool_refusals",
        "on_down",
        "persistent",
        "queue",
        "hedging",
        "persistence",
        "_primary",
        "_backup",
        "_all",
        "_primaries",
        "_primaries_available",
        "_rotation",
        "_counting",
        "_pending",
    )

    def __init__(self, config: PoolConfig, previous: Pool | None = None, reloading: bool = False) -> None:
        """A pool from its config, ready at once when it stands alone.

        On a reload (`reloading`), the pool is built beside the running one, `previous` (the running
        pool of the same name, if any): it holds only its settings, and touches none of the running
        servers, until the commit of the reload calls `take_over()`. A reload that is refused before
        its commit thus leaves the running servers exactly as they were.
        """
        self.name = config.name
        self.policy_name = config.policy
        self.retries = config.retries
        # TLS to the servers: a context per server, kept across a reload that leaves the settings alone
        # (so that the idle connections, kept per endpoint, and the TLS sessions stay usable)
        self.tls_settings = config.tls
        self.tls: UpstreamTls | None = None
        if config.tls is not None:
            unchanged = previous is not None and previous.tls_settings == config.tls
            self.tls = previous.tls if unchanged and previous is not None else UpstreamTls(config.tls)
        self.connect_timeout = config.timeouts.connect
        self.response_timeout = config.timeouts.response
        self.backup_pool: Pool | None = None  # linked by the controller once every pool exists
        self.min_up = config.min_up
        self.passive_failures = config.passive.consecutive_failures if config.passive is not None else 0
        self.passive_5xx = config.passive is not None and config.passive.on_5xx
        self.max_down_fraction = config.max_down_fraction
        self.slow_start = config.slow_start
        self.disable_grace = config.disable_grace
        self.on_down: Callable[[Server, str], None] | None = None  # a worker tells its supervisor
        self.fronted: list[Pool] = []  # pools whose backup pool this is: they hear of its tier
        # counters
        self.failovers = 0  # times new requests moved to another backup tier (never to none)
        self.retried = 0  # requests sent again to another server
        self.depool_refusals = 0  # downs the depool guard refused
        self._rotation = config.policy == "round_robin"
        self.persistent = config.persistence is not None  # known before take_over builds `persistence`
        # Servers with max_connections: requests wait here when none they may go to has room (limits.py)
        self.queue: Queue[Server] | None = None
        if any(server.max_connections for server in config.servers):
            self.queue = Queue(config.queue.max_size, config.queue.timeout)
        hedge = config.hedge  # http: a slow idempotent request goes to a second server too (hedging.py)
        self.hedging = Hedging(hedge.after, hedge.floor, hedge.max_extra) if hedge is not None else None
        self.persistence: Persistence[Server] | None = None  # built with the servers, in take_over
        self.servers: list[Server] = []
        self.by_name: dict[str, Server] = {}
        self._pending: tuple[PoolConfig, Pool | None, bool] | None = (config, previous, reloading)
        if previous is None and not reloading:
            self.take_over()
        else:
            # Until the commit: no server, so nothing could be picked (nothing asks before the commit).
            self._primaries: list[Server] = []
            self._primaries_available = 0
            self._primary: Policy[Server] = make_policy(config.policy, [])
            self._backup: Policy[Server] = make_policy(config.policy, [])
            self._all: Policy[Server] | None = None
            self._counting = False
            self.tier = Tier.NONE

    def take_over(self) -> None:
        """Put the servers in place and build the policies over them; for a pool built beside a running
        one, this is the commit of the reload (the controller calls it, in the one synchronous step that
        installs the new pools).

        The servers that stay (same name) are handed over from the previous pool as they are at this
        instant: health, admin state, live weight and counters, including any drain, probe verdict or
        weight change applied while the reload was being prepared. Servers the reload adds (to this pool
        or with a new pool) earn their traffic. The previous pool's counters carry on here.
        """
        if self._pending is None:
            raise RuntimeError(f"pool {self.name}: its servers were already taken over")
        config, previous, reloading = self._pending
        self._pending = None
        kept: dict[str, Server] = previous.by_name if previous is not None else {}
        self.servers = [
            kept[server.name].reconfigure(server, self) if server.name in kept else Server(server, self)
            for server in config.servers
        ]
        self.by_name = {server.name: server for server in self.servers}
        self.persistence = _persistence(config, self.servers, [s for s in self.servers if not s.backup])
        if previous is not None:  # counters only ever go up, across reloads too
            self.failovers = previous.failovers
            self.retried = previous.retried
            self.depool_refusals = previous.depool_refusals
            if self.persistence is not None and previous.persistence is not None:
                self.persistence.carry_on(previous.persistence)
            if self.queue is not None and previous.queue is not None:
                self.queue.carry_on(previous.queue)
            if previous.hedging is not None:
                if self.hedging is not None:
                    self.hedging.carry_on(previous.hedging)
                previous.hedging.stop()
        primaries = [s for s in self.servers if not s.backup]
        self._primaries = primaries
        self._primary = make_policy(config.policy, primaries)
        self._backup = make_policy(config.policy, [s for s in self.servers if s.backup])
        # Priority-group activation: with min_up > 1 the backups may serve beside the primaries.
        self._all = make_policy(config.policy, self.servers) if self.min_up > 1 else None
        self._counting = self._primary.follows_inflight  # else taken/released are not the policy's business
        start = config.health.start
        if config.health.type == "none":
            start = "up"  # nothing would ever bring it up
        elif start is None:
            start = "down" if reloading else "up"  # a server a reload adds earns its traffic
        for server in self.servers:
            if server.name not in kept:
                server.up = start == "up"
            if server.available:
                self._group(server).add(server)
                if self._all is not None:
                    self._all.add(server)
        self._primaries_available = sum(1 for s in primaries if s.available)
        self.tier = self._tier()
        if previous is not None and previous.queue is not None:
            self._requeue(previous)

    def _requeue(self, previous: Pool) -> None:
        """After a reload: what waited in the previous pool's queue goes on here, or chooses again."""
        queue = self.queue
        if queue is None:  # no limit any more: every waiting request chooses a server now
            assert previous.queue is not None
            for ticket in previous.queue.everyone():
                ticket.ready(None)
            return
        kept = set(self.servers)
        for server in list(queue.by_server):
            if server not in kept or not server.max_connections:
                for ticket in queue.for_server(server):
                    ticket.ready(None)
        for server in self.servers:
            self._serve_queue(server)

    def fail_over_to(self, backup_pool: Pool) -> None:
        """Link the pool that takes this pool's requests when it has no server left (the controller, at commit)."""
        self.backup_pool = backup_pool
        backup_pool.fronted.append(self)
        self.tier = self._tier()

    # -- picking --

    def pick(self) -> Server | None:
        """The server for the next request: primaries, backups, then the backup pool; None if none.

        With max_connections, a server at its limit is passed over for one with room; when none has
        room, the one picked is returned at its limit, and the request waits in the queue."""
        if self._primaries_available >= self.min_up:
            policy = self._primary
        elif self._primaries_available and self._all is not None:
            policy = self._all
        else:
            policy = self._backup
        server = policy.pick()
        if server is None:
            return self.backup_pool.pick() if self.backup_pool is not None else None
        if self._rotation and server.weight < server.full_weight:
            server = self._ramped_turn(server)
        if self.queue is not None and server.max_connections and server.inflight >= server.max_connections:
            return self._with_room(policy, server)
        return server

    def _with_room(self, policy: Policy[Server], full: Server) -> Server:
        """`full` is at its limit: the policy's next pick with room (a rotation moves on to it), else
        the least loaded for its weight with room, else `full` itself (the request will wait)."""
        for _ in range(len(self.servers)):
            server = policy.pick()
            if server is None or server is full:
                break
            if not server.max_connections or server.inflight < server.max_connections:
                return server
        best: Server | None = None
        for server in self.servers:
            if (
                server.available
                and server.backup is full.backup
                and (not server.max_connections or server.inflight < server.max_connections)
                and (best is None or server.inflight * best.full_weight < best.inflight * server.full_weight)
            ):
                best = server
        return best if best is not None else full

    def has_room(self, server: Server) -> bool:
        """Whether `server` may take one more request now (always, without max_connections)."""
        return not server.max_connections or server.inflight < server.max_connections

    def _ramped_turn(self, server: Server) -> Server:
        """A rotation has no weights: a slow-starting server takes its turn as often as its ramp says."""
        server.ramp_credit += server.weight / server.full_weight
        if server.ramp_credit >= 1.0:
            server.ramp_credit -= 1.0
            return server
        other = self._group(server).pick()
        return other if other is not None else server

    def pick_other(self, tried: Collection[Server]) -> Server | None:
        """A server for a retry: available and not in `tried`, or None. Retries are rare: this may scan."""
        server = self.pick()
        if server is None or server not in tried:
            return server
        for group in (False, True):  # primaries, then backups, in configuration order
            for candidate in self.servers:
                if candidate.backup is group and candidate.available and candidate not in tried:
                    return candidate
        return self.backup_pool.pick_other(tried) if self.backup_pool is not None else None

    def taken(self, server: Server) -> None:
        """A request or connection was sent to `server` (a server of this pool)."""
        server.inflight += 1
        server.requests += 1
        if self._counting:
            self._group(server).taken(server)
            if self._all is not None:
                self._all.taken(server)

    def released(self, server: Server) -> None:
        """A request or connection to `server` ended, whatever its outcome; with a queue, the slot
        goes to the oldest request that waits and that `server` may take."""
        server.inflight -= 1
        if self._counting:
            self._group(server).released(server)
            if self._all is not None:
                self._all.released(server)
        queue = self.queue
        if queue is not None and queue.length:
            self._serve_queue(server)

    def _serve_queue(self, server: Server) -> None:
        """Give `server`'s free slots to the oldest tickets it may serve: its own while it is up and
        not disabled (persistence), anyone's while it takes new requests."""
        queue = self.queue
        if queue is None or server.pool is not self:
            return
        own = server.up and server.admin is not AdminState.DISABLED
        anyone = server.available and self._in_tier(server)
        while queue.length and self.has_room(server) and (own or anyone):
            ticket = queue.next_for(server, own, anyone, time.monotonic())
            if ticket is None:
                return
            self.taken(server)  # the slot is the ticket's before anything else can take it
            ticket.ready(server)

    def _in_tier(self, server: Server) -> bool:
        """Whether the pool's new requests may go to `server` now (its failover order)."""
        tier = self.tier
        if tier is Tier.PRIMARIES:
            return not server.backup
        return tier is Tier.WITH_BACKUPS or (tier is Tier.BACKUPS and server.backup)

    # -- what real traffic tells (passive detection) --

    def report_failure(self, server: Server, reason: str) -> None:
        """A connect failure, reset or timeout on real traffic to `server`."""
        server.consecutive_failures += 1
        threshold = self.passive_failures
        if threshold and server.up and server.consecutive_failures >= threshold:
            self.set_health(server, False, f"passive: {server.consecutive_failures} consecutive failures ({reason})")

    # -- state changes --

    def set_health(self, server: Server, up: bool, reason: str = "", force: bool = False) -> bool:
        """Mark `server` up or down; False when the depool guard refused to take it down.

        `force` skips the guard: a worker follows what its supervisor, which applied it, decided.
        """
        if server.up == up:
            return True
        if not up and not force and not server.backup and self._guard_refuses(server):
            self.depool_refusals += 1
            server.consecutive_failures = 0
            if server.guarded:
                return False
            server.guarded = True
            log.error(
                "pool %s: server %s would go down (%s) but the depool guard keeps it: "
                "more than %.0f%% of the primaries would be out",
                self.name,
                server.name,
                reason,
                (self.max_down_fraction or 0) * 100,
            )
            return False
        server.up = up
        server.consecutive_failures = 0
        server.guarded = False
        server.transition_reason = reason
        server.transition_time = time.time()
        server.transitions["up" if up else "down"] += 1
        if up:
            server.reported = 100
            if self.slow_start:
                server.ramp_until = time.monotonic() + self.slow_start
                server.ramp_credit = 0.0
                server.weight = max(1, server.full_weight // 100)  # 1% to begin with
            else:
                server.weight = server.full_weight  # a server coming back starts at its ratio
        if not force:
            log.warning("pool %s: server %s is %s: %s", self.name, server.name, "UP" if up else "DOWN", reason or "-")
        self._availability_changed(server)
        if not up and not force and self.on_down is not None:
            self.on_down(server, reason)
        return True

    def _guard_refuses(self, server: Server) -> bool:
        if self.max_down_fraction is None:
            return False
        primaries = self._primaries
        down = sum(1 for s in primaries if not s.up) + 1
        return down / len(primaries) > self.max_down_fraction

    def set_admin(self, server: Server, state: AdminState) -> None:
        if server.admin is state:
            return
        server.admin = state
        server.admin_time = time.time()
        log.warning("pool %s: server %s is now %s", self.name, server.name, state.value)
        self._availability_changed(server)

    def set_weight(self, server: Server, percent: int) -> None:
        """Set the live weight to `percent` (0-100) of the configured ratio, as dynamic_ratio reports.

        0 means "send nothing new"; any other percentage gives the server some traffic.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"weight percentage must be from 0 to 100, got {percent}")
        server.reported = percent
        self._set_weight(server, server.ratio * percent * WEIGHT_SCALE // 100)

    def follow_weight(self, server: Server, weight: int) -> None:
        """Take a live weight computed elsewhere (a worker follows its supervisor's)."""
        self._set_weight(server, weight)

    def _set_weight(self, server: Server, weight: int) -> None:
        if weight == server.weight:
            return
        was_available = server.available
        server.weight = weight
        if was_available and server.available:
            self._group(server).weight_changed(server)
            if self._all is not None:
                self._all.weight_changed(server)
        else:
            self._availability_changed(server)

    def tick(self, now: float) -> None:
        """Advance slow starts and the p99 a hedge waits; the runtime calls this a few times a second."""
        if self.hedging is not None:
            self.hedging.refresh()
        if not self.slow_start:
            return
        for server in self.servers:
            if server.ramp_until:
                full = server.ratio * server.reported * WEIGHT_SCALE // 100
                if now >= server.ramp_until:
                    server.ramp_until = 0.0
                    self._set_weight(server, full)
                elif server.up:
                    share = 1.0 - (server.ramp_until - now) / self.slow_start
                    self._set_weight(server, max(1, int(full * share)))

    def _availability_changed(self, server: Server) -> None:
        group = self._group(server)
        available = server.available
        if available:
            group.add(server)
        else:
            group.remove(server)
        if self._all is not None:
            if available:
                self._all.add(server)
            else:
                self._all.remove(server)
        if not server.backup:
            self._primaries_available = sum(1 for s in self._primaries if s.available)
        self._tier_changed()
        queue = self.queue
        if queue is not None and queue.length:
            if not (server.up and server.admin is not AdminState.DISABLED):
                for ticket in queue.for_server(server):  # its own users choose again (persistence)
                    ticket.ready(None)
            if self.tier is Tier.NONE or self.tier is Tier.BACKUP_POOL:
                for ticket in queue.everyone():  # nothing here will free a slot for them
                    ticket.ready(None)
            else:  # the server, or a tier that just began to serve, may have room for them
                for each in self.servers:
                    self._serve_queue(each)

    def _tier(self) -> Tier:
        """Where `pick` sends new requests now, in the order it tries them."""
        primaries = self._primaries_available
        if primaries >= self.min_up:
            return Tier.PRIMARIES
        backups = any(s.available for s in self.servers if s.backup)
        if primaries and self._all is not None:
            return Tier.WITH_BACKUPS if backups else Tier.PRIMARIES
        if backups:
            return Tier.BACKUPS
        if self.backup_pool is not None and self.backup_pool.tier is not Tier.NONE:
            return Tier.BACKUP_POOL
        return Tier.NONE

    def _tier_changed(self) -> None:
        """Log where new requests go when that changes, and count failovers: only real moves."""
        before, tier = self.tier, self._tier()
        if tier is before:
            return
        self.tier = tier
        available = f"{self._primaries_available} of {len(self._primaries)} primaries available"
        if tier is Tier.PRIMARIES:
            log.warning("pool %s: failback: %s, the primaries serve again", self.name, available)
        elif tier is Tier.NONE:
            dr = f", none in backup pool {self.backup_pool.name}" if self.backup_pool is not None else ""
            log.error(
                "pool %s: no server left (%s, no backup server%s): requests get 503, with the maintenance page if set",
                self.name,
                available,
                dr,
            )
        else:
            self.failovers += 1
            if tier is Tier.WITH_BACKUPS:
                to = "the backup servers serve beside the primaries"
            elif tier is Tier.BACKUPS:
                to = "failing over to the backup servers"
            else:
                to = f"failing over to backup pool {self.backup_pool.name if self.backup_pool else '?'}"
            log.warning("pool %s: %s, below min_up %d: %s", self.name, available, self.min_up, to)
        for pool in self.fronted:
            pool._tier_changed()

    def _group(self, server: Server) -> Policy[Server]:
        return self._backup if server.backup else self._primary


def _persistence(config: PoolConfig, servers: list[Server], primaries: list[Server]) -> Persistence[Server] | None:
    """The pool's persistence over its servers: a cookie may name any of them, backups too (a
    session begun on a backup stays there while it is up); hashing spreads keys over the primaries."""
    settings = config.persistence
    if settings is None:
        return None
    return Persistence(
        settings.type,
        config.name,
        servers if settings.type == COOKIE else primaries,
        lambda server: server.name,
        lambda server: float(server.ratio),
        cookie=settings.cookie,
        max_age=round(settings.max_age) if settings.max_age is not None else None,
        header=settings.header,
        balance=settings.balance,
        secret=settings.secret.encode(),
    )


def _endpoint(config: ServerConfig, pool: Pool) -> Endpoint:
    """Where `config`'s connections go, before its name is resolved: with the pool's TLS, if any."""
    address = config.address
    if pool.tls is None:
        return Endpoint(address.host, address.port)
    settings = pool.tls_settings
    name = settings.server_name if settings is not None and settings.server_name else address.host
    return Endpoint(address.host, address.port, pool.tls.context_for(address.host, address.port), name)
