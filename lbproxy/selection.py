"""Which server gets a request, or a connection: one call for both proxies, no I/O.

Selection has two halves. As a request's head ends, `Steering.steer` reads what the head says about
where it goes: the listener's route (`routing`) names the pool, or denies the request; the pool's
persistence (`persistence`) reads its key (a cookie, taken out of the head that goes on; a header;
the client's address). A listener with neither has no `Steering`: its heads pay nothing for it.

Then `select` picks the server, whenever a request is sent or sent again: the server its persistence
key names while that server may keep it, else the pool's failover order and policy (`Pool.pick`), or,
for a retry, a server not yet tried (`Pool.pick_other`). With per-server limits, the pool passes
over a server at its limit; `must_wait` says when the server chosen has no room, and `waits_for`
whether the request then waits for that server (its persistence key names it) or for any (limits.py
has the queue). The TCP proxy calls them with no head, and the client's address as the key.
`retry_elsewhere` is the one rule for trying another server after a failure.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Final

from lbproxy.framing import BadRequest
from lbproxy.persistence import COOKIE, header_value
from lbproxy.pool import AdminState
from lbproxy.routing import host_key

_DISABLED: Final = AdminState.DISABLED
_DRAINING: Final = AdminState.DRAINING

if TYPE_CHECKING:
    from lbproxy.limits import RateLimiter
    from lbproxy.persistence import Persistence
    from lbproxy.pool import Pool, Server
    from lbproxy.request_head import RequestHead, Steer
    from lbproxy.routing import Route, RouteTable


class Denied(BadRequest):
    """A route's `deny`: lbproxy answers with its status, and the request goes nowhere."""

    def __init__(self, route: Route) -> None:
        assert route.deny is not None
        super().__init__(route.deny, f"denied by route {route.name}")


class RedirectHttps:
    """`redirect_https`: every request is answered 308 to the same target over https; nothing goes on.

    `Location: https://<Host without its port, lower-case>[:port]<target>`, the target byte for byte (the path of
    an absolute-form one); no port for 443. The Host has passed `framing.check_host`, so nothing in it
    can break the header line. A request without a Host gets 400: there is nowhere to send it.
    """

    __slots__ = ("port",)

    def __init__(self, port: int) -> None:
        self.port = b"" if port == 443 else b":%d" % port

    def steer(
        self, method: bytes, target: bytes, host: bytes | None, fields: list[bytes], client_ip: bytes
    ) -> tuple[Pool, bytes | None]:
        if host is None:
            raise BadRequest(400, "no Host to redirect to https")
        host = host_key(host)  # as routes see it: without its port, lower-case
        if target[:1] != b"/":
            _, sep, rest = target.partition(b"://")
            slash = rest.find(b"/")
            target = rest[slash:] if sep and slash >= 0 else b"/"
        location = b"Location: https://" + host + self.port + target + b"\r\n"
        raise BadRequest(308, "redirected to https", extra=location)


class Steering:
    """What a listener with routes, a rate limit, or whose pool keeps sessions, reads in each request's head."""

    __slots__ = ("routes", "default", "steer", "limit", "inner")  # `steer`: the method for this listener, chosen once

    def __init__(self, routes: RouteTable | None, default: Pool, limit: RateLimit | None = None) -> None:
        self.routes = routes
        self.default = default
        self.limit = limit
        self.inner: Steer = self._routed if routes is not None else self._persisted
        self.steer: Steer = self._limited if limit is not None else self.inner

    def _limited(
        self, method: bytes, target: bytes, host: bytes | None, fields: list[bytes], client_ip: bytes
    ) -> tuple[Pool, bytes | None]:
        """The client's token first (`rate_limit`): over its rate, the request is refused (429)."""
        limit = self.limit
        assert limit is not None
        limit.check(fields, client_ip)
        return self.inner(method, target, host, fields, client_ip)

    def _persisted(
        self, method: bytes, target: bytes, host: bytes | None, fields: list[bytes], client_ip: bytes
    ) -> tuple[Pool, bytes | None]:
        pool = self.default
        persistence = pool.persistence
        return pool, (persistence.key_of(fields, client_ip) if persistence is not None else None)

    def _routed(
        self, method: bytes, target: bytes, host: bytes | None, fields: list[bytes], client_ip: bytes
    ) -> tuple[Pool, bytes | None]:
        """The pool for a request and its persistence key; raises `Denied` for a route's deny.

        `fields` is the head as the reader gathered it (name, b": ", value, CRLF, ...); a
        persistence cookie is taken out of it before the head that goes to the server is built.
        """
        pool = self.default
        routes = self.routes
        if routes is not None:
            route = routes.pick(method, target, host, fields)
            if route is not None:
                route.requests += 1
                if route.deny is not None:
                    raise Denied(route)
                pool = route.target  # type: ignore[assignment]  # the runtime fills it with the Pool
        persistence = pool.persistence
        return pool, (persistence.key_of(fields, client_ip) if persistence is not None else None)


class RateLimit:
    """A listener's `rate_limit`: whose bucket a request takes a token from, and the refusal."""

    __slots__ = ("limiter", "header", "status")

    def __init__(self, limiter: RateLimiter, header: bytes | None, status: int) -> None:
        self.limiter = limiter
        self.header = header  # lower-case; None: the client's address is the key
        self.status = status

    def check(self, fields: list[bytes], client_ip: bytes) -> None:
        """Raises BadRequest (the status, with Retry-After) when the client has no token left.

        Keyed by a header, a request without it is keyed by its address: leaving the header out
        does not escape the limit."""
        key = client_ip
        if self.header is not None:
            key = header_value(fields, self.header) or client_ip
        wait = self.limiter.allow(key, time.monotonic())
        if wait:
            raise BadRequest(self.status, "rate limited", extra=b"Retry-After: %d\r\n" % math.ceil(wait))


def select(
    pool: Pool, request: RequestHead | None, tried: tuple[Server, ...], key: bytes | None = None
) -> Server | None:
    """The server for `request` (None in tcp mode) from `pool`, never one of `tried`; None if there is none.

    `key` is the tcp proxy's persistence key (the client's address); a request carries its own.
    """
    persistence = pool.persistence
    if persistence is None:
        return pool.pick_other(tried) if tried else pool.pick()
    if request is not None:
        key = request.key
        if key is not None and not tried:  # a cookie's usual case, inline: its server, still serving
            server = persistence.named.get(key)
            # A draining server keeps its sessions (HAProxy's semantics): only down or disabled loses them.
            if server is not None and server.up and server.admin is not _DISABLED:
                persistence.hits += 1
                return server
    return _persisted(pool, persistence, request, tried, key)


def _persisted(
    pool: Pool,
    persistence: Persistence[Server],
    request: RequestHead | None,
    tried: tuple[Server, ...],
    key: bytes | None,
) -> Server | None:
    if persistence.kind == COOKIE:
        jar = persistence.jar
        assert jar is not None
        server = jar.server_for(key) if key is not None else None
        if server is not None and server.up and server.admin is not _DISABLED and server not in tried:
            persistence.hits += 1
            return server
        if server is None:
            persistence.misses += 1
        else:
            persistence.redispatches += 1
        chosen = pool.pick_other(tried) if tried else pool.pick()
        if chosen is not None and request is not None:
            request.cookie = persistence.lines.get(chosen)  # None for a server of the backup pool
        return chosen
    ring = persistence.ring
    assert ring is not None
    if key is None:  # type header, and the request has none: the pool's policy
        persistence.misses += 1
        return pool.pick_other(tried) if tried else pool.pick()
    if tried:
        persistence.redispatches += 1
    else:
        persistence.hits += 1
        known = persistence.recall(key)
        if known is not None and known.admin is _DRAINING and known.up and known.pool is pool:
            return known  # a draining server keeps the users it has; new keys go elsewhere
    chosen = ring.pick(key, lambda server: server.available and server not in tried, _inflight)
    if chosen is None:
        chosen = pool.pick_other(tried) if tried else pool.pick()  # no primary left: backups, the backup pool
    if chosen is not None:
        persistence.remember(key, chosen)
    return chosen


def must_wait(server: Server) -> bool:
    """Whether a request chosen for `server` must wait in its pool's queue: it is at its limit."""
    return bool(server.max_connections) and server.inflight >= server.max_connections


def waits_for(pool: Pool, key: bytes | None, server: Server) -> Server | None:
    """What a request that must wait waits for: its own server, when its persistence key chose it
    (a user stays on their server while it is up), else None: any server of the pool."""
    persistence = pool.persistence
    if key is None or persistence is None:
        return None
    if persistence.kind == COOKIE:  # the cookie names it; else the policy chose it, and any will do
        return server if persistence.named.get(key) is server else None
    return server


def _inflight(server: Server) -> int:
    return server.inflight


def retry_elsewhere(tried: int, retries: int, reached: bool, idempotent: bool) -> bool:
    """After a failed server, may the request (or connection) go to another? Within the pool's
    `retries`, when provably nothing reached the failed one (its connection never opened), or when
    sending it twice is harmless. The L4 proxy asks only for connections that never opened."""
    return tried < retries and (not reached or idempotent)
