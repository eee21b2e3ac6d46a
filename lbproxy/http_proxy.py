"""The L7 proxy: HTTP/1.1 requests from clients, each sent to a server its pool picks.

Two `asyncio.Protocol`s relay one exchange at a time: `HttpProxy`, here, faces the client and parses
requests with httptools; `http_upstream.UpstreamConnection` faces a server and parses its
responses. Requests are
balanced one by one (a keep-alive client spreads over the farm), upstream connections are kept idle
per server and reused, and bodies stream both ways under back-pressure (flow.ReadGate), never held
whole. What reaches the server is re-framed by lbproxy: the request line and the Host header byte for
byte, the other headers in their order and case, less the hop-by-hop ones, plus X-Forwarded-*.

This module reads its settings from an `HttpListener` that the runtime builds; it knows nothing of the
config file. Timeouts are deadlines stored on each connection and checked by the listener's `tick()`,
so the hot path never creates or cancels a timer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import httptools

from lbproxy import flow, framing, proxy_protocol, tls, transaction
from lbproxy import hedging as hedging_
from lbproxy.framing import BadRequest
from lbproxy.handshake import Accepting, Handshakes
from lbproxy.hedging import HEDGEABLE, watch
from lbproxy.http_upstream import CHUNK_END, CRLF, ClientSide, HedgedConnection, Listening, UpstreamConnection
from lbproxy.pool import Pool, Server
from lbproxy.request_head import RequestReader, Settings
from lbproxy.selection import RateLimit, RedirectHttps, Steering, must_wait, select, waits_for
from lbproxy.transaction import AWAITING, CONNECTING, DONE, IDEMPOTENT, QUEUED, RELAYING, REPLAY_LIMIT, SENDING
from lbproxy.upstream import Endpoint, IdleConnections, dial

if TYPE_CHECKING:
    from typing import TypeAlias

    from lbproxy.hedging import Hedging
    from lbproxy.limits import Ticket, TrustedProxies
    from lbproxy.request_head import Steer
    from lbproxy.routing import RouteTable

    Exchange: TypeAlias = transaction.Exchange["UpstreamConnection"]

log = logging.getLogger("lbproxy.http")

# Deadline kinds of a client connection.
IDLE: Final = 0  # keep-alive, between requests
HEADER: Final = 1  # a request head is being received
BODY: Final = 2  # a request body is being received
RESPONSE: Final = 3  # waiting for the server
TUNNEL: Final = 4  # an upgraded connection: no byte either way for tunnel_timeout, and it is closed
UNREAD: Final = 5  # the client leaves a response unread: its fault, never the server's
CLOSING: Final = 6  # closed by lbproxy, its last bytes still going out: aborted at the deadline
QUEUE: Final = 7  # waiting in the pool's queue for a server's slot: 503 at the queue's timeout


# Upper bounds of the request-duration histogram, in seconds (Prometheus' defaults, plus 30 and 60). Typed
# as a tuple of any length: mypyc would keep a fixed one unboxed and box it again for every bisect_left.
DURATION_BOUNDS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)

_STATUS_LINES: Final = {status: b"HTTP/1.1 %d " % status for status in range(100, 600)}
_STATUS_CLASS: Final = [framing.status_class(status) for status in range(1000)]  # llhttp: 3 digits


def certificate_states(certificates: tuple[tuple[str, float], ...]) -> list[dict[str, object]]:
    """A TLS listener's names and when their certificates expire, for the API and the status page."""
    now = time.time()
    return [
        {"name": name, "expires": expiry, "days_left": int((expiry - now) // 86400)} for name, expiry in certificates
    ]


class HttpListener(Settings, Listening):
    """What the connections of one http listener share: settings, pool, idle upstreams, counters."""

    mode: Final = "http"

    __slots__ = (
        "name",
        "pool",
        "loop",
        "idle",
        "max_idle",
        "idle_timeout",
        "proto_field",
        "forwarded",
        "maintenance",
        "retry_after",
        "max_connections",
        "header_timeout",
        "keepalive_timeout",
        "body_timeout",
        "tunnel_timeout",
        "connect_timeout",
        "response_timeout",
        "max_header_size",
        "max_header_count",
        "max_target",
        "max_body",
        "access_log",
        "connections",
        "connections_total",
        "rejected",
        "requests",
        "responses",
        "errors",
        "retries",
        "durations",
        "duration_sum",
        "accept_proxy",
        "bad_proxy_headers",
        "wrong_protocol",
        "draining",
        "outbox",
        "routes",
        "steer",
        "secure",
        "client_certificates",
        "certificates",
        "handshakes",
        "accepting",
        "rate_limit",
        "trusted",
    )

    # What a reload may change in place (the rest are counters and live state).
    SETTINGS = (
        "pool",
        "certificates",
        "routes",
        "steer",
        "proto_field",
        "forwarded",
        "maintenance",
        "retry_after",
        "max_connections",
        "header_timeout",
        "keepalive_timeout",
        "body_timeout",
        "tunnel_timeout",
        "connect_timeout",
        "response_timeout",
        "max_header_size",
        "max_header_count",
        "max_target",
        "max_body",
        "max_idle",
        "idle_timeout",
        "access_log",
        "accept_proxy",
        "rate_limit",
        "trusted",
    )

    def __init__(
        self,
        name: str,
        pool: Pool,
        *,
        loop: asyncio.AbstractEventLoop,
        tls: bool = False,
        forwarded: bool = True,
        maintenance: bytes | None = None,
        retry_after: float = 30.0,
        max_connections: int = 10_000,
        header_timeout: float = 10.0,
        keepalive_timeout: float = 60.0,
        body_timeout: float = 300.0,
        tunnel_timeout: float = 3600.0,
        connect_timeout: float = 5.0,
        response_timeout: float = 60.0,
        max_header_size: int = 64 * 1024,
        max_header_count: int = 100,
        max_target: int = 16 * 1024,
        max_body: int | None = None,
        max_idle: int = 256,
        idle_timeout: float = 30.0,
        access_log: logging.Logger | None = None,
        accept_proxy: bool = False,
        routes: RouteTable | None = None,
        redirect_https: int | None = None,
        client_certificates: bool = False,
        certificates: tuple[tuple[str, float], ...] = (),
        rate_limit: RateLimit | None = None,
        trusted: TrustedProxies | None = None,
    ) -> None:
        self.name = name
        self.pool = pool
        self.routes = routes  # the route table, whose routes' targets are the runtime's pools
        self.rate_limit = rate_limit
        self.trusted = trusted
        # Only a listener with routes, a rate limit or trusted proxies, or whose pool keeps sessions,
        # reads anything in a head before it goes on.
        steers = routes is not None or pool.persistent or rate_limit is not None or trusted is not None
        self.steer: Steer | None = Steering(routes, pool, rate_limit).steer if steers else None
        if redirect_https is not None:
            self.steer = RedirectHttps(redirect_https).steer  # answers every request: nothing goes on
        self.secure = tls  # a persistence cookie gets `Secure`
        self.client_certificates = client_certificates  # mutual TLS: say whose certificate it was
        self.certificates = certificates  # (name, expiry as a Unix time) of each name served over TLS
        self.handshakes = Handshakes() if tls else None  # counted by handshake.Accepting
        self.accepting: set[Accepting] = set()  # TLS: connections before their handshake (handshake.py)
        self.loop = loop
        self.idle: dict[Endpoint, IdleConnections[UpstreamConnection]] = {}  # see idle_for()
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.proto_field = b"X-Forwarded-Proto: https\r\n" if tls else b"X-Forwarded-Proto: http\r\n"
        self.forwarded = forwarded
        self.maintenance = maintenance
        self.retry_after = b"Retry-After: %d\r\n" % round(retry_after)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.tunnel_timeout = tunnel_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_header_size = max_header_size
        self.max_header_count = max_header_count
        self.max_target = max_target
        self.max_body = max_body
        self.access_log = access_log
        self.connections: set[HttpProxy] = set()
        # counters, read at scrape time
        self.connections_total = 0
        self.rejected = 0  # connections refused over max_connections
        self.requests = 0
        self.responses = [0] * 6  # by status class, as Server.responses
        self.errors: dict[int, int] = {}  # responses lbproxy generated itself, by status
        self.retries = 0
        self.accept_proxy = accept_proxy
        self.bad_proxy_headers = 0
        self.wrong_protocol = 0  # TLS handshakes sent to this plain HTTP port
        self.draining = False  # shutting down: answer what is in flight, then close each connection
        self.outbox = flow.Outbox(loop)  # every write of this listener's connections, client and server side
        self.durations = [0] * (len(DURATION_BOUNDS) + 1)  # histogram buckets, not cumulative; last: +Inf
        self.duration_sum = 0.0

    def default_host(self) -> bytes:
        """The Host of a request that came without one (HTTP/1.0): the pool's first server."""
        return str(self.pool.servers[0].address).encode()

    def observe(self, exchange: Exchange) -> None:
        """Count one finished exchange in the duration histogram."""
        duration = time.monotonic() - exchange.started
        self.duration_sum += duration
        self.durations[bisect_left(DURATION_BOUNDS, duration)] += 1

    def __call__(self) -> HttpProxy:
        """The protocol factory handed to `loop.create_server` (behind a handshake.Acceptor over TLS)."""
        return HttpProxy(self)

    def proxied(self, protocol: HttpProxy, client: bytes) -> None:
        """Over TLS the PROXY header comes before the handshake: the acceptor read it, and tells
        the connection whose it is once the handshake is over, before its first request."""
        protocol.reader.client_is(client)

    def tick(self, now: float) -> None:
        """Enforce the deadlines of every connection and drop stale idle upstreams; called ~4 times a second."""
        flow.expire(self.connections, now)
        if self.accepting:
            flow.expire(self.accepting, now)
        for idle in self.idle.values():
            idle.sweep(now)

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    @property
    def rate_limited(self) -> int | None:
        """Requests refused by the rate limit; None without one."""
        return self.rate_limit.limiter.limited if self.rate_limit is not None else None

    def state(self) -> dict[str, object]:
        """Counters for the admin API."""
        return {
            "mode": "http",
            "pool": self.pool.name,
            "active_connections": len(self.connections),
            "counters": {
                "connections": self.connections_total,
                "rejected": self.rejected,
                "requests": self.requests,
                "responses": {f"{n}xx": self.responses[n] for n in range(1, 6)},
                "errors": {str(status): count for status, count in sorted(self.errors.items())},
                "retries": self.retries,
                "bad_proxy_headers": self.bad_proxy_headers,
                "wrong_protocol": self.wrong_protocol,
                "rate_limited": self.rate_limited,
            },
            "certificates": certificate_states(self.certificates),
            "tls_handshakes": self.handshakes.state() if self.handshakes is not None else None,
            "routes": [
                {
                    "name": route.name,
                    "pool": route.pool_name,
                    "deny": route.deny,
                    "requests": route.requests,
                }
                for route in (self.routes.routes if self.routes is not None else ())
            ],
        }

    def route_counts(self) -> list[tuple[str, int]]:
        """(route name, requests) in the listener's order: what metrics and the workers' sums read."""
        return [(route.name, route.requests) for route in self.routes.routes] if self.routes is not None else []

    def reconfigure(self, other: HttpListener) -> None:
        """Take the settings of `other` (built from a reloaded config), keeping counters and connections."""
        if self.rate_limit is not None and other.rate_limit is not None:  # the clients' buckets go on
            other.rate_limit.limiter.carry_on(self.rate_limit.limiter)
        if self.routes is not None and other.routes is not None:  # a route's counter lives on by its name
            counted = {route.name: route.requests for route in self.routes.routes}
            for route in other.routes.routes:
                route.requests += counted.get(route.name, 0)
        for name in self.SETTINGS:
            setattr(self, name, getattr(other, name))
        for idle in self.idle.values():
            idle.max_idle = self.max_idle
            idle.idle_timeout = self.idle_timeout

    def forget_servers(self, servers: set[Server]) -> None:
        """Close idle connections to endpoints no server has any more (gone, or moved), after a reload."""
        live = {server.endpoint for server in servers}
        for endpoint, idle in list(self.idle.items()):
            if endpoint not in live:
                idle.close_all()
                del self.idle[endpoint]

    def drain_connections(self) -> None:
        """Shutting down: idle connections close now, busy ones after their response."""
        self.draining = True
        for accepting in list(self.accepting):
            accepting.close_now()
        for connection in list(self.connections):
            if connection.active is None and not connection.queue and connection.reading is None:
                connection.close_now()
        self.close_idle()

    def idle_for(self, server: Server) -> IdleConnections[UpstreamConnection]:
        """The idle connections to `server`'s endpoint (the server may belong to a backup pool)."""
        idle = self.idle.get(server.endpoint)
        if idle is None:
            idle = self.idle[server.endpoint] = IdleConnections(self.max_idle, self.idle_timeout)
        return idle

    def close_idle(self) -> None:
        for idle in self.idle.values():
            idle.close_all()

    def cut_server(self, server: Server) -> int:
        """Close every connection to `server` (after a disable's grace time); returns how many clients lost one."""
        idle = self.idle.get(server.endpoint)
        if idle is not None:
            idle.close_all()
        cut = 0
        for connection in list(self.connections):
            active = connection.active
            if (active is not None and active.server is server) or (
                connection.pinned is not None and connection.pinned.server is server
            ):
                connection.cut()
                cut += 1
        return cut


class HttpProxy(asyncio.Protocol, ClientSide):
    """The client side of the L7 proxy: one instance per client connection."""

    __slots__ = (
        "listener",
        "loop",
        "transport",
        "gate",
        "reader",
        "parser",
        "head_size",
        "reading",
        "active",
        "queue",
        "pinned",
        "tunnel",
        "relay",
        "early",
        "refusal",
        "proxy_header",
        "closed",
        "client_eof",
        "deadline",
        "deadline_kind",
        "client_busy",
        "got_bytes",
        "ticket",
        "hedge",
        "hedged",
    )

    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.gate: flow.ReadGate | None = None
        reader = RequestReader(
            listener,
            transaction.Exchange,
            self.on_request,
            self.on_body,
            self.on_message_complete,
            self.on_chunk_header,
        )
        self.reader = reader
        self.parser = reader.parser
        self.head_size = 0  # bytes read since the last head ended, while no body is being read
        self.reading: Exchange | None = None  # the request whose head or body is being received
        self.active: Exchange | None = None  # the request being served; later ones wait in `queue`
        self.queue: deque[Exchange] = deque()
        self.pinned: UpstreamConnection | None = None  # NTLM/Negotiate: this client keeps that connection
        self.tunnel: UpstreamConnection | None = None  # after a 101: the server leg of `relay`
        self.relay: flow.Relay | None = None
        self.early: list[bytes] = []  # bytes after an upgrade request, for the new protocol
        self.refusal: tuple[int, str, bytes] | None = None  # an answer owed after the requests ahead of it
        # with accept_proxy, until the PROXY header is read
        # Over TLS the acceptor takes the PROXY header off (handshake.py): it precedes the handshake.
        self.proxy_header = proxy_protocol.HeaderReader() if listener.accept_proxy and not listener.secure else None
        self.closed = False
        self.client_eof = False
        self.deadline = 0.0
        self.deadline_kind = IDLE
        self.client_busy = False  # the client's transport buffers more than it reads (pause_writing)
        self.got_bytes = False  # any byte of the current request has arrived
        self.ticket: Ticket[Server] | None = None  # the active request waits in its pool's queue
        self.hedge: UpstreamConnection | None = None  # a second server's connection racing the first
        self.hedged: Exchange | None = None  # the last request watched for a hedge

    # -- connection events --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        listener = self.listener
        self.transport = transport
        self.gate = flow.admit(listener, self, transport)
        if self.gate is None:
            self.closed = True
            return
        peer = transport.get_extra_info("peername")
        if peer:
            self.reader.client_is(str(peer[0]).encode())
        if listener.client_certificates:  # the handshake verified it: it is the same for every request
            subject = tls.subject(transport.get_extra_info("peercert")).encode()
            self.reader.client_cert = b"X-Client-Cert-Subject: " + subject + b"\r\nX-Client-Cert-Verify: SUCCESS\r\n"
        self._arm(HEADER, listener.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        self.deadline = 0.0
        active = self.active
        if active is not None:
            upstream = active.upstream
            if upstream is not None:
                upstream.abandon()  # the server connection is mid-exchange: it cannot be reused
            self._release(active)
            self.active = None
        self.queue.clear()
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None
        if self.tunnel is not None:
            self.tunnel.close()

    def eof_received(self) -> bool:
        # A client may half-close after its last request: answer it, then close.
        self.client_eof = True
        relay = self.relay
        if relay is not None:
            # A half-close is passed on: the server may still answer, until it is done too.
            if relay.client_ended():
                return True
            if self.tunnel is not None:
                self.tunnel.close()
            return False
        active = self.active
        if active is not None and active.phase == QUEUED:
            # A client that closes while its request waits for a server has gone (HAProxy's
            # `option abortonclose`): it leaves the queue, and no server ever sees the request.
            self.cut()
            return False
        reading = self.reading
        if reading is not None:
            # The body still owed can never come: give up on the request now (HAProxy and nginx do)
            # rather than hold a server connection until the body deadline.
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "listener %s: %s closed its side with the body of %s %s unfinished",
                    self.listener.name,
                    self.reader.client_ip.decode(),
                    reading.method.decode("latin-1"),
                    reading.target.decode("latin-1"),
                )
            self.cut()
            return False
        return self.active is not None or bool(self.queue)

    def pause_writing(self) -> None:
        self.client_busy = True
        active = self.active
        upstream = self.tunnel if self.tunnel is not None else (active.upstream if active is not None else None)
        if upstream is not None and upstream.gate is not None:
            upstream.gate.pause(flow.PEER_BUSY)
        if self.deadline_kind == RESPONSE:
            # The server is held back by the client: if time runs out now, it is the client's fault.
            self._arm(UNREAD, self._response_timeout(active))

    def resume_writing(self) -> None:
        self.client_busy = False
        active = self.active
        upstream = self.tunnel if self.tunnel is not None else (active.upstream if active is not None else None)
        if upstream is not None and upstream.gate is not None:
            upstream.gate.resume(flow.PEER_BUSY)
        if self.deadline_kind == UNREAD:
            if active is not None:
                self._arm(RESPONSE, self._response_timeout(active))
            elif self.queue:
                self._serve_next()  # a pipelined request waited for the client to read
            else:
                self._arm(IDLE, self.listener.keepalive_timeout)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.from_client(data)
            return
        if self.closed or self.refusal is not None:
            return
        if self.proxy_header is not None:
            data = self._read_proxy_header(data)
            if not data:
                return
        reading = self.reading
        if reading is None:  # between bodies, every byte is head: bound it before llhttp buffers it
            if not self.got_bytes and data[0] < 32:  # a request starts with a method's letter
                if data[0] == 22 and not self.listener.secure:  # a TLS handshake record
                    self._wrong_protocol()
                    return
                # RFC 9112 §2.2 lets a server skip empty lines before a request line, and llhttp
                # skips any CR or LF there: lbproxy refuses bare CRs everywhere, so here too.
                self._refuse_in_turn(400, "a control character (CR, LF...) before the request line")
                return
            self.head_size += len(data)
            self.got_bytes = True
        elif reading.chunked:
            before = reading.body_size
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, BadRequest):
                if cause.status == 505 and framing.versionless(data):
                    self._refuse_in_turn(400, "request line without an HTTP version")
                else:
                    self._refuse_in_turn(cause.status, cause.reason, cause.extra)
            else:
                log.exception("internal error while parsing a request", exc_info=cause)
                self._refuse_in_turn(400, "bad request")
            return
        except httptools.HttpParserError as error:
            self._refuse_in_turn(400, str(error))
            return
        if reading is not None:
            if reading.chunked and self.reading is reading:
                self._count_chunk_framing(len(data) - (reading.body_size - before))
            return
        if self.reading is None and self.got_bytes:  # a head has begun and not ended
            if self.head_size > self.listener.max_header_size:
                self._refuse_in_turn(431, "header block too large")
            elif not self.reader.field_count and self.reader.url and framing.versionless(framing.last_line(data)):
                self._refuse_in_turn(400, "request line without an HTTP version")  # HTTP/0.9
            elif self.deadline_kind == IDLE:  # it has header_timeout to arrive whole, from its first bytes
                self._arm(HEADER, self.listener.header_timeout)

    def _wrong_protocol(self) -> None:
        """A TLS client on a plain HTTP port: nothing it could read is possible; closed at once, counted."""
        listener = self.listener
        listener.wrong_protocol += 1
        log.info(
            "listener %s: %s sent a TLS handshake to this plain HTTP port: closed",
            listener.name,
            self.reader.client_ip.decode(),
        )
        self.cut()

    def _count_chunk_framing(self, size: int) -> None:
        """Count `size` bytes of a chunked body's read that were not payload against the head's limits.

        llhttp buffers nothing of a body, but httptools gathers each trailer field in a bytes that
        grows by `+=`: what lies between payload bytes (chunk lines, extensions, trailers) beyond
        32 bytes a chunk (`on_chunk_header` credits them) is counted in `head_size`, so that a
        trailer section is bounded by `limits.header_size` as a head is, read by read.
        """
        self.head_size += size
        if self.head_size > self.listener.max_header_size:
            self._refuse_in_turn(431, "chunk framing or trailer section too large")

    def on_chunk_header(self) -> None:
        self.head_size -= 32  # a chunk line and the CRLF after its data, with room for a short extension

    def _read_proxy_header(self, data: bytes) -> bytes:
        """Take the PROXY header off the connection's first bytes; returns what follows it."""
        header = self.proxy_header
        assert header is not None
        try:
            rest = header.feed(data)
        except proxy_protocol.ProxyHeaderError as error:
            self.listener.bad_proxy_headers += 1
            log.info("listener %s: closing %s: %s", self.listener.name, self.reader.client_ip.decode(), error)
            self._close()
            return b""
        if rest is None:
            return b""
        if header.client is not None:
            self.reader.client_is(header.client[0].encode())
        self.proxy_header = None
        return rest

    # -- requests: heads from the reader, bodies from llhttp --
    # llhttp calls the RequestReader as a head arrives; it hands over each whole head, checked and
    # rebuilt for the server (on_request). on_body and on_message_complete come straight from llhttp.

    def on_request(self, exchange: Exchange) -> None:
        self.head_size = 0  # RECEIVED until _dispatch
        listener = self.listener
        has_body = exchange.has_body
        listener.requests += 1
        if has_body:
            self.reading = exchange  # until on_message_complete
            if self.active is None:  # a pipelined one's body is read, and timed, in its turn
                self._arm(BODY, listener.body_timeout)
        else:
            exchange.request_done = True
            self.got_bytes = False
        if self.active is None:
            self.active = exchange
            if not has_body:  # _arm(RESPONSE), inline: this runs for nearly every request
                self.deadline_kind = RESPONSE
                pool = exchange.pool
                self.deadline = self.loop.time() + (
                    listener.response_timeout if pool is None else pool.response_timeout
                )
            self._dispatch(exchange)
        else:
            self.queue.append(exchange)  # pipelined: it waits its turn, and we read no further
            assert self.gate is not None
            self.gate.pause(flow.WAITING)

    def on_body(self, body: bytes) -> None:
        exchange = self.reading
        if exchange is None:
            return
        size = exchange.body_size + len(body)
        exchange.body_size = size
        max_body = self.listener.max_body
        if max_body is not None and size > max_body:
            raise BadRequest(413, "request body too large")
        upstream = exchange.upstream
        if upstream is not None:  # attached: the request is going to it
            upstream.send_body(exchange, body)
            if exchange.replayable:
                if size <= REPLAY_LIMIT:
                    exchange.held.append(body)
                else:
                    exchange.replayable = False
                    exchange.held.clear()
        else:
            exchange.held.append(body)  # reading is paused until it can go: bounded by one read...
            if exchange.phase == QUEUED and size > REPLAY_LIMIT and self.gate is not None:
                self.gate.pause(flow.WAITING)  # ...or, while it waits in the queue, by the replay limit

    def on_message_complete(self) -> None:
        exchange = self.reading
        if exchange is None:
            return
        self.reading = None
        self.got_bytes = False
        self.head_size = 0
        self.reader.body_ended()
        exchange.request_done = True
        if exchange.phase == SENDING:
            exchange.phase = AWAITING
        upstream = exchange.upstream
        if upstream is not None and exchange.chunked:
            upstream.send(CHUNK_END)
        if exchange is self.active and (upstream is None or not upstream.response_started):
            self._arm(RESPONSE, self._response_timeout(exchange))

    # -- serving a request --

    def _dispatch(self, exchange: Exchange, fresh: bool = False, slot: Server | None = None) -> None:
        """Send `exchange` to a server: the pinned connection, an idle one, or a new one. `slot`:
        the server whose slot the queue took for it (then nothing is chosen again)."""
        if slot is None:
            pinned = self.pinned
            if pinned is not None:
                if pinned.is_open():
                    exchange.server = pinned.server
                    pinned.server.pool.taken(pinned.server)
                    self._attach(exchange, pinned)
                    return
                self.pinned = None
            server = select(exchange.pool or self.listener.pool, exchange, exchange.tried)
            if server is None:
                if exchange.tried:
                    # what the client would have got without retries: the last server's failure
                    self._refuse(504 if exchange.timed_out else 502, "no other server to retry on")
                else:
                    self._unavailable(exchange)
                return
            pool = server.pool
            if pool.queue is not None and must_wait(server):
                self._wait(exchange, server)
                return
            pool.taken(server)
        else:
            server = slot
        exchange.server = server
        # A reused connection may be closed by its server as the request crosses the wire, and then
        # nothing proves the request was not acted on: a non-idempotent one goes on a new connection.
        if not fresh and exchange.method in IDEMPOTENT:
            idle = self.listener.idle.get(server.endpoint)
            upstream = idle.get(self.loop.time()) if idle is not None else None
            if upstream is not None:
                self._attach(exchange, upstream)
                return
        exchange.phase = CONNECTING
        assert self.gate is not None
        self.gate.pause(flow.WAITING)
        self.loop.create_task(self._open(exchange, server))

    def _wait(self, exchange: Exchange, server: Server) -> None:
        """Every server `exchange` may go to is at its limit: it waits in the pool's queue, its head
        held and the client's reading paused, until a server's slot is its or the queue's timeout."""
        pool = server.pool
        queue = pool.queue
        assert queue is not None
        assert self.gate is not None
        ticket = queue.join(
            lambda chosen: self._dequeued(exchange, chosen), waits_for(pool, exchange.key, server), time.monotonic()
        )
        if ticket is None:
            self._unavailable(exchange, "queue full")
            return
        self.ticket = ticket
        exchange.phase = QUEUED
        # Reading goes on, so that a client that leaves is seen at once (its EOF, see eof_received):
        # a body is held up to the replay limit, a pipelined request pauses reading as always.
        if exchange.body_size <= REPLAY_LIMIT:
            self.gate.resume(flow.WAITING)
        self._arm(QUEUE, queue.timeout)

    def _dequeued(self, exchange: Exchange, server: Server | None) -> None:
        """The queue's answer: `server`'s slot is the request's (taken for it), or None: choose again."""
        self.ticket = None
        if exchange is not self.active or self.closed:
            if server is not None:
                server.pool.released(server)
            return
        if exchange.request_done:
            self._arm(RESPONSE, self._response_timeout(exchange))
        else:
            self._arm(BODY, self.listener.body_timeout)
        if not self.queue and self.gate is not None:
            self.gate.resume(flow.WAITING)  # the rest of a body may come; a new connection pauses again
        if server is None:
            exchange.phase = transaction.RECEIVED
            self._dispatch(exchange)
            return
        self._dispatch(exchange, slot=server)

    async def _open(self, exchange: Exchange, server: Server) -> None:
        listener = self.listener
        pool = exchange.pool
        timeout = listener.connect_timeout if pool is None else pool.connect_timeout
        # a pool that hedges gets connections that watch for the first byte; others pay nothing
        kind = HedgedConnection if server.pool.hedging is not None else UpstreamConnection
        upstream = await dial(self.loop, lambda: kind(server, listener), server, timeout)
        if isinstance(upstream, str):
            if exchange is self.active and not self.closed:
                self.upstream_failed(exchange, None, upstream, timeout=False)
            else:
                self._release(exchange)
            return
        if exchange is not self.active or self.closed:
            if not listener.idle_for(server).put(upstream, self.loop.time()):
                upstream.close()
            return
        if not self.queue:
            assert self.gate is not None
            self.gate.resume(flow.WAITING)
        self._attach(exchange, upstream)

    def _attach(self, exchange: Exchange, upstream: UpstreamConnection) -> None:
        exchange.phase = AWAITING if exchange.request_done else SENDING
        exchange.upstream = upstream
        upstream.begin(self, exchange)
        if self.client_busy and upstream.gate is not None:
            upstream.gate.pause(flow.PEER_BUSY)  # the new peer must hear that the client is not reading
        held = exchange.held
        if not held:
            upstream.send(exchange.forward)
        elif exchange.chunked:
            parts = [exchange.forward]
            for body in held:
                parts += (b"%x\r\n" % len(body), body, CRLF)
            upstream.send_parts(parts)
        else:
            upstream.send_parts([exchange.forward, *held])
        if not exchange.replayable:
            held.clear()
        if exchange.request_done and exchange.chunked:
            upstream.send(CHUNK_END)
        if upstream.hedged:
            self._watch(exchange, upstream)

    def _watch(self, exchange: Exchange, upstream: UpstreamConnection) -> None:
        """A request sent on a connection of a hedging pool: a hedge may follow it (hedge_due)."""
        hedging = upstream.server.pool.hedging
        assert isinstance(upstream, HedgedConnection)
        if (
            hedging is not None
            and exchange.method in HEDGEABLE
            and not exchange.has_body
            and not exchange.upgrade
            and self.pinned is None
            and self.hedged is not exchange  # one hedge at most per request, even if it is retried
        ):
            self.hedged = exchange
            upstream.watched = hedging  # its first byte settles the race (first_byte)
            hedging.sent()
            watch(self.loop, hedging, self, exchange)

    def upstream_failed(
        self, exchange: Exchange, upstream: UpstreamConnection | None, reason: str, timeout: bool
    ) -> None:
        """The server connection of `exchange` failed before the response was complete."""
        hedge = self.hedge
        if hedge is not None and self._hedge_failed(exchange, upstream, hedge, reason):
            return
        server = exchange.server
        exchange.upstream = None
        exchange.timed_out = timeout
        if server is None:  # already released: the exchange was given up
            self._close()
            return
        server.pool.released(server)
        exchange.server = None
        listener = self.listener
        stale = upstream is not None and upstream.reused and not timeout and not upstream.response_started
        if not stale:
            server.pool.report_failure(server, reason)
        if exchange.phase >= RELAYING:
            # The client already has part of this response: all we can do is cut it short.
            log.warning("server %s/%s failed mid-response: %s", server.pool.name, server.name, reason)
            self._close()
            return
        response_started = upstream is not None and upstream.response_started
        pool = exchange.pool or listener.pool
        decision = transaction.after_failure(exchange, upstream is not None, stale, response_started, pool.retries)
        if decision == transaction.SAME_SERVER:
            self._redispatch(exchange, server, fresh=True)
            return
        if decision == transaction.OTHER_SERVER:
            exchange.tried += (server,)
            listener.retries += 1
            pool.retried += 1
            self._redispatch(exchange, None, fresh=False)
            return
        log.warning("server %s/%s failed: %s", server.pool.name, server.name, reason)
        self._refuse(504 if timeout else 502, reason)

    def _redispatch(self, exchange: Exchange, server: Server | None, fresh: bool) -> None:
        if exchange.request_done:
            self._arm(RESPONSE, self._response_timeout(exchange))
        if server is not None:
            if server.pool.queue is not None and must_wait(server):  # its slot went to one that waited
                self._wait(exchange, server)
                return
            exchange.server = server
            server.pool.taken(server)
            exchange.phase = CONNECTING
            assert self.gate is not None
            self.gate.pause(flow.WAITING)
            self.loop.create_task(self._open(exchange, server))
            return
        if not self.queue and self.gate is not None:
            # The failed attempt paused reading while it connected; an idle connection now takes
            # the request at once, and the rest of its body must be read (a new one pauses again).
            self.gate.resume(flow.WAITING)
        self._dispatch(exchange, fresh)

    # -- hedging (hedging.py decides when, and whether the budget allows) --

    def hedge_due(self, exchange: Exchange) -> None:
        """`after` has passed since `exchange` went to its server: if no byte of an answer came,
        the same request goes to a second server too, and the first to answer wins."""
        upstream = exchange.upstream
        first = exchange.server
        if (
            exchange is not self.active
            or self.closed
            or self.hedge is not None
            or upstream is None
            or upstream.response_started
            or first is None
            or exchange.phase != AWAITING
        ):
            return
        hedging = first.pool.hedging
        if hedging is None or not hedging.may_hedge():
            return
        second = first.pool.pick_other((first, *exchange.tried))
        if second is None or second is first or (second.pool.queue is not None and must_wait(second)):
            hedging.tokens += 1.0  # not spent: there was nowhere to send it
            hedging.results[hedging_.UNAVAILABLE] += 1
            return
        second.pool.taken(second)
        idle = self.listener.idle.get(second.endpoint)
        leg = idle.get(self.loop.time()) if idle is not None else None
        if isinstance(leg, HedgedConnection):
            self._send_hedge(exchange, leg, second)
        else:
            if leg is not None and idle is not None and not idle.put(leg, self.loop.time()):
                leg.close()  # a connection of a pool that does not hedge, at the same endpoint
            self.loop.create_task(self._open_hedge(exchange, second))

    async def _open_hedge(self, exchange: Exchange, second: Server) -> None:
        listener = self.listener
        timeout = listener.connect_timeout if exchange.pool is None else exchange.pool.connect_timeout
        leg = await dial(self.loop, lambda: HedgedConnection(second, listener), second, timeout)
        if isinstance(leg, str):  # no second server after all: the first keeps the request alone
            second.pool.released(second)
            second.pool.report_failure(second, leg)
            return
        upstream = exchange.upstream
        if (
            exchange is not self.active
            or self.closed
            or upstream is None
            or upstream.response_started
            or self.hedge is not None
        ):
            second.pool.released(second)  # the race was over before it began
            if not listener.idle_for(second).put(leg, self.loop.time()):
                leg.close()
            return
        self._send_hedge(exchange, leg, second)

    def _send_hedge(self, exchange: Exchange, leg: HedgedConnection, second: Server) -> None:
        self.hedge = leg
        leg.begin(self, exchange)
        leg.server = second  # it serves the exchange on behalf of the second server, not the first
        leg.watched = second.pool.hedging
        leg.send(exchange.forward)

    def first_byte(self, exchange: Exchange, upstream: UpstreamConnection, hedging: Hedging) -> None:
        """The first byte of an answer to `exchange` came from `upstream`: a race, if any, is won."""
        hedging.answered(time.monotonic() - exchange.started)
        hedge = self.hedge
        if hedge is None:
            return
        self.hedge = None
        if upstream is not hedge:  # the first server answered first: the second copy is dropped
            hedging.results[hedging_.LOST] += 1
            hedge.abandon()
            hedge.server.pool.released(hedge.server)
            return
        hedging.results[hedging_.WON] += 1
        loser = exchange.upstream
        first = exchange.server
        exchange.upstream = upstream
        exchange.server = upstream.server
        if loser is not None:
            loser.abandon()
        if first is not None:
            first.pool.released(first)
            # A server that sent no byte while its peer answered in full time is failing: passive
            # detection takes a frozen one out after a few such losses in a row.
            first.pool.report_failure(first, f"no answer in {hedging.after * 1000:.0f} ms, its hedge answered")
        persistence = first.pool.persistence if first is not None else None
        if exchange.cookie is not None and persistence is not None:  # the new user is the winner's
            exchange.cookie = persistence.lines.get(upstream.server)

    def _hedge_failed(
        self, exchange: Exchange, upstream: UpstreamConnection | None, hedge: UpstreamConnection, reason: str
    ) -> bool:
        """One side of a race failed before either answered: the other carries on alone. True when
        that settled it (nothing else to do), False when the request is to be failed as usual."""
        self.hedge = None
        if upstream is hedge:  # the second copy failed: the first is still awaited
            hedge.server.pool.released(hedge.server)
            hedge.server.pool.report_failure(hedge.server, reason)
            return True
        if upstream is None or upstream is not exchange.upstream:
            hedge.abandon()
            hedge.server.pool.released(hedge.server)
            return False
        first = exchange.server
        exchange.upstream = hedge  # the first failed: the second, already sent, is the answer now
        exchange.server = hedge.server
        if upstream is not None:
            upstream.abandon()
        if first is not None:
            first.pool.released(first)
            first.pool.report_failure(first, reason)
        self._arm(RESPONSE, self._response_timeout(exchange))  # the second's own time to answer
        return True

    def _unavailable(self, exchange: Exchange, reason: str = "no server available") -> None:
        listener = self.listener
        extra = listener.retry_after
        if listener.maintenance is not None:
            self._refuse(503, reason, body=listener.maintenance, extra=extra)
        else:
            self._refuse(503, reason, extra=extra)

    def flush(self, parts: list[bytes]) -> None:
        """Write what one read from the server produced, in one system call (`write`, inline)."""
        transport = self.transport
        if transport is not None and not self.closed:
            self.listener.outbox.write(transport, parts[0] if len(parts) == 1 else b"".join(parts))

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.listener.outbox.write(transport, data)

    def exchange_done(self, exchange: Exchange, upstream: UpstreamConnection, pin: bool) -> None:
        """The response to `exchange` has been relayed whole."""
        listener = self.listener
        server = exchange.server
        status = exchange.status
        kind = _STATUS_CLASS[status]
        if server is not None:
            pool = server.pool
            pool.released(server)
            server.responses[kind] += 1
            if status >= 500 and pool.passive_5xx:
                pool.report_failure(server, f"HTTP {status}")
            elif server.consecutive_failures:
                server.consecutive_failures = 0
        listener.responses[kind] += 1
        listener.observe(exchange)
        if listener.access_log is not None:
            self._access_log(exchange)
        if pin:
            self.pinned = upstream
        exchange.phase = DONE
        self.active = None
        if (
            not exchange.keep_alive
            or not exchange.request_done
            or (self.client_eof and not self.queue)
            or (listener.draining and not self.queue)
        ):
            self._close()
            return
        if self.queue:
            if self.client_busy:
                # No response is produced for a client that is not reading the last one (the
                # pipelined requests behind it wait): what it leaves unread stays bounded.
                self._arm(UNREAD, self._response_timeout(self.queue[0]))
            else:
                self._serve_next()
            return
        if self.refusal is not None:
            status, reason, extra = self.refusal
            self._refuse(status, reason, extra=extra)
            return
        gate = self.gate
        if gate is not None and gate.reasons:
            gate.resume(flow.WAITING)
        if self.reading is None:
            if self.got_bytes:
                self._arm(HEADER, listener.header_timeout)
            else:  # _arm(IDLE), inline: the end of nearly every exchange
                self.deadline_kind = IDLE
                self.deadline = self.loop.time() + listener.keepalive_timeout

    def _serve_next(self) -> None:
        """Make the first pipelined request the active one and send it."""
        queue = self.queue
        following = queue.popleft()
        self.active = following
        if not queue:
            assert self.gate is not None
            self.gate.resume(flow.WAITING)
        if following.request_done:
            self._arm(RESPONSE, self._response_timeout(following))
        else:
            self._arm(BODY, self.listener.body_timeout)
        self._dispatch(following)

    def start_tunnel(self, upstream: UpstreamConnection) -> flow.Relay:
        """The server switched protocols (101): from now on, bytes flow both ways untouched."""
        listener = self.listener
        client, server = self.transport, upstream.transport
        assert client is not None
        assert server is not None
        relay = flow.Relay(self.loop, client, server, self, listener.tunnel_timeout, upstream.server, listener.outbox)
        self.tunnel = upstream
        self.relay = relay
        if self.active is not None:
            self.active.phase = transaction.TUNNEL
        self._arm(TUNNEL, listener.tunnel_timeout)
        if self.early:
            relay.from_client(b"".join(self.early))
            self.early = []
        if self.client_eof:
            relay.client_ended()  # the client finished writing before the server switched
        assert self.gate is not None
        self.gate.resume(flow.WAITING)
        return relay

    def _upgrade_requested(self, rest: bytes) -> None:
        """httptools stops after a request that asks to switch protocols; `rest` is what followed it."""
        exchange = self.queue[-1] if self.queue else self.active
        if exchange is None or not exchange.upgrade:
            if rest and not self.closed:
                self.data_received(rest)  # an h2c upgrade we stripped: go on parsing as HTTP/1.1
            return
        # Bytes after the head belong to the new protocol: keep them until the server says 101.
        if rest:
            self.early.append(rest)
        assert self.gate is not None
        self.gate.pause(flow.WAITING)

    # -- answering and closing --

    def _refuse_in_turn(self, status: int, reason: str, extra: bytes = b"") -> None:
        """Refuse the request being read; one pipelined behind others gets its error after their answers."""
        active = self.active
        reading = self.reading
        if active is None or reading is active:
            self._refuse(status, reason, extra=extra)  # the request in flight itself is bad (its body, say)
            return
        if reading is not None and self.queue and self.queue[-1] is reading:
            self.queue.pop()
        self.reading = None
        self.refusal = (status, reason, extra)  # nothing more is read from this client
        assert self.gate is not None
        self.gate.pause(flow.WAITING)

    def _refuse(self, status: int, reason: str, body: bytes | None = None, extra: bytes = b"") -> None:
        """Answer with an error of lbproxy's own, then close: the connection state is not to be trusted."""
        listener = self.listener
        listener.errors[status] = listener.errors.get(status, 0) + 1
        listener.responses[framing.status_class(status)] += 1
        if status < 500 and log.isEnabledFor(logging.INFO):
            log.info("listener %s: %d for %s: %s", listener.name, status, self.reader.client_ip.decode(), reason)
        exchange = self.active
        if exchange is not None:
            if exchange.phase >= RELAYING:
                self._close()  # part of an earlier response is out: an error now would corrupt it
                return
            exchange.status = status
            listener.observe(exchange)
            if exchange.upstream is not None:
                exchange.upstream.abandon()  # e.g. a bad pipelined request behind one in flight
                exchange.upstream = None
            if listener.access_log is not None:
                self._access_log(exchange)
            self._release(exchange)
            exchange.phase = DONE
            self.active = None
        self.write(framing.error_response(status, body, extra))
        self._close()

    def _close(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            self.deadline = 0.0
            self.listener.outbox.flush()
            transport.close()  # after the write buffer is flushed
            if transport.get_write_buffer_size():
                # A peer that does not read would keep it open for ever: it stays counted (it is
                # open) until connection_lost, and is aborted if it has not gone by the deadline.
                self._arm(CLOSING, flow.CLOSE_LINGER)
            else:
                self.listener.connections.discard(self)
        else:
            self.listener.connections.discard(self)
        active = self.active
        if active is not None:
            if active.upstream is not None:
                active.upstream.abandon()
            self._release(active)
            self.active = None

    def close_now(self) -> None:
        """Close this client connection: an idle keep-alive one (shutting down), or the client
        side of a tunnel whose server leg is done."""
        self._close()

    def cut(self) -> None:
        """Drop this client connection and its server connection at once (a disabled server's grace is over)."""
        if self.pinned is not None:
            self.pinned.abandon()
            self.pinned = None
        self._close()
        if self.transport is not None:
            self.transport.abort()

    def _release(self, exchange: Exchange) -> None:
        hedge = self.hedge
        if hedge is not None:  # the race is off: nobody will read the second server's answer
            self.hedge = None
            hedge.abandon()
            hedge.server.pool.released(hedge.server)
        ticket = self.ticket
        if ticket is not None:  # it leaves the queue where it stands
            self.ticket = None
            ticket.cancel()
        if exchange.server is not None:
            exchange.server.pool.released(exchange.server)
            exchange.server = None

    def _arm(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.loop.time() + seconds

    def _response_timeout(self, exchange: Exchange | None) -> float:
        """`timeouts.response` of the exchange's pool: a route's, or the listener's."""
        pool = exchange.pool if exchange is not None else None
        return self.listener.response_timeout if pool is None else pool.response_timeout

    def extend_response_deadline(self) -> None:
        if self.deadline_kind == RESPONSE:  # per read of a response body: _response_timeout, inline
            active = self.active
            pool = active.pool if active is not None else None
            self.deadline = self.loop.time() + (
                self.listener.response_timeout if pool is None else pool.response_timeout
            )

    def deadline_passed(self) -> None:
        """Called by the listener's tick when this connection's deadline has gone by."""
        kind = self.deadline_kind
        self.deadline = 0.0
        if kind == IDLE:
            self._close()
        elif kind in (CLOSING, UNREAD):
            self.cut()  # not reading: no goodbye can reach it, and the server is not to blame
        elif kind == TUNNEL:
            if self.tunnel is not None:
                self.tunnel.close()
            self._close()
        elif kind == HEADER:
            if self.got_bytes:
                self._refuse(408, "request header timeout")
            else:
                self._close()
        elif kind == BODY:
            active = self.active
            if active is not None and active.upstream is not None and active.upstream.response_started:
                self._close()
            else:
                self._refuse(408, "request body deadline")
        elif kind == QUEUE:
            ticket = self.ticket
            active = self.active
            if ticket is None or active is None:
                self._close()
                return
            self.ticket = None
            ticket.timed_out()
            self._unavailable(active, "queue timeout")
        elif kind == RESPONSE:
            active = self.active
            if active is None or active.upstream is None:
                self._close()
                return
            upstream = active.upstream
            assert active.server is not None
            active.server.failures += 1
            upstream.abandon()
            self.upstream_failed(active, upstream, "response timeout", timeout=True)

    def _access_log(self, exchange: Exchange) -> None:
        assert self.listener.access_log is not None
        server = exchange.server
        self.listener.access_log.info(
            json.dumps(
                {
                    "time": time.time(),
                    "listener": self.listener.name,
                    # set only when trusted proxies named the client (request_head): else unset
                    "client": (getattr(exchange, "client", None) or self.reader.client_ip).decode(),
                    "method": exchange.method.decode("latin-1"),
                    "target": exchange.target.decode("latin-1"),
                    "status": exchange.status,
                    "server": server.name if server is not None else None,
                    "bytes": exchange.response_bytes,
                    "duration": round(time.monotonic() - exchange.started, 6),
                }
            )
        )
