"""Servers, their state, and pools that pick one of them per request or connection.

A `Server` carries what a load balancer knows of one front-end: its address, configured ratio and
live weight, health state (up/down), admin state (enabled/draining/disabled), in-flight count and
plain-int counters that metrics read at scrape time. A `Pool` owns its servers and one policy per
priority group (primaries, then `backup: true` servers); every state change goes through the pool's
methods so that the policies hear of it. This module knows nothing of sockets or YAML beyond the
frozen config objects it is built from.
"""

from __future__ import annotations

import enum

from lbproxy.balancing import Policy, make_policy
from lbproxy.config import Address, PoolConfig, ServerConfig


class AdminState(enum.Enum):
    ENABLED = "enabled"
    DRAINING = "draining"  # no new requests; in-flight ones finish
    DISABLED = "disabled"


class Server:
    """One front-end server of a pool. Hashable by identity: policies key their tables on it."""

    __slots__ = (
        "name",
        "address",
        "ratio",
        "backup",
        "up",
        "admin",
        "weight",
        "inflight",
        "requests",
        "responses",
        "connect_failures",
        "failures",
        "sent_bytes",
        "received_bytes",
        "connect_host",
        "__weakref__",
    )

    def __init__(self, config: ServerConfig) -> None:
        self.name = config.name
        self.address: Address = config.address
        self.ratio = config.ratio
        self.backup = config.backup
        self.up = True
        self.admin = AdminState.ENABLED
        self.weight = config.ratio  # live weight: the ratio, or what dynamic_ratio's probe reports
        self.inflight = 0
        # Counters, read by metrics at scrape time: plain ints, bumped on the hot path at no cost.
        self.requests = 0  # requests (http) or connections (tcp) sent, ever
        self.responses = [0] * 6  # by status class: [1] is 1xx ... [5] is 5xx
        self.connect_failures = 0
        self.failures = 0  # resets, timeouts and garbage seen on established connections
        self.sent_bytes = 0
        self.received_bytes = 0
        self.connect_host = config.address.host  # the runtime replaces a host name by its address

    @property
    def available(self) -> bool:
        """Whether a new request or connection may go to this server."""
        return self.up and self.admin is AdminState.ENABLED and self.weight > 0

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.address} up={self.up} admin={self.admin.value} w={self.weight}>"


class Pool:
    """The servers of one pool and the policies that choose among them."""

    __slots__ = ("name", "policy_name", "retries", "servers", "by_name", "_primary", "_backup")

    def __init__(self, config: PoolConfig) -> None:
        self.name = config.name
        self.policy_name = config.policy
        self.retries = config.retries
        self.servers = [Server(server) for server in config.servers]
        self.by_name = {server.name: server for server in self.servers}
        self._primary: Policy[Server] = make_policy(config.policy, [s for s in self.servers if not s.backup])
        self._backup: Policy[Server] = make_policy(config.policy, [s for s in self.servers if s.backup])
        for server in self.servers:
            if server.available:
                self._group(server).add(server)

    def pick(self) -> Server | None:
        """The server for the next request: a primary, else a backup server, else None."""
        server = self._primary.pick()
        if server is None:
            server = self._backup.pick()
        return server

    def pick_other(self, tried: list[Server]) -> Server | None:
        """A server for a retry: available and not in `tried`, or None. Retries are rare: this may scan."""
        server = self.pick()
        if server is None or server not in tried:
            return server
        for group in (False, True):  # primaries, then backups, in configuration order
            for candidate in self.servers:
                if candidate.backup is group and candidate.available and candidate not in tried:
                    return candidate
        return None

    def taken(self, server: Server) -> None:
        """A request or connection was sent to `server`."""
        server.inflight += 1
        server.requests += 1
        self._group(server).taken(server)

    def released(self, server: Server) -> None:
        """A request or connection to `server` ended, whatever its outcome."""
        server.inflight -= 1
        self._group(server).released(server)

    def set_health(self, server: Server, up: bool) -> None:
        if server.up == up:
            return
        server.up = up
        if up and server.weight != server.ratio:
            server.weight = server.ratio  # a server coming back starts at its configured ratio
        self._availability_changed(server)

    def set_admin(self, server: Server, state: AdminState) -> None:
        if server.admin is state:
            return
        server.admin = state
        self._availability_changed(server)

    def set_weight(self, server: Server, percent: int) -> None:
        """Set the live weight to `percent` (0-100) of the configured ratio, as dynamic_ratio reports.

        A non-zero percentage never rounds to weight 0; 0 means "send nothing new".
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"weight percentage must be from 0 to 100, got {percent}")
        weight = max(1, round(server.ratio * percent / 100)) if percent else 0
        if weight == server.weight:
            return
        was_available = server.available
        server.weight = weight
        if was_available and server.available:
            self._group(server).weight_changed(server)
        else:
            self._availability_changed(server)

    def _availability_changed(self, server: Server) -> None:
        group = self._group(server)
        if server.available:
            group.add(server)
        else:
            group.remove(server)

    def _group(self, server: Server) -> Policy[Server]:
        return self._backup if server.backup else self._primary
