"""The TLS handshake of an http listener's connections: who may start one, how it ended, what it cost.

A TLS listener's socket accepts plain TCP (no `ssl=`): a server made with `ssl=` drops a failed
handshake without a word and cannot answer a client that speaks plain HTTP. `Acceptor` is the
socket's protocol factory; each connection starts as an `Accepting` protocol in one of these phases:

- **first bytes** (`WAITING`): nothing read yet; the listener's `header_timeout` bounds it (a
  deadline its tick checks, as for its connections). With `accept_proxy` the PROXY header comes
  first, in the clear, and is taken off here.
- **handshake** (`HANDSHAKE`): the first byte was a TLS record (22). The event loop's own SSL protocol
  (uvloop's, compiled) takes the transport over with the listener's context (SNI picks among the
  certificates: tls.ListenerContexts) and the listener's protocol behind it; the same deadline bounds
  the handshake. When it is done, the listener's protocol runs on the TLS transport as if the socket
  had been made with `ssl=`.
- **refused**: the letter of an HTTP method gets nginx's answer, 400 "plain HTTP to a TLS port";
  any other byte, a bad PROXY header or the deadline closes the connection.

Every end is counted in the listener's `Handshakes` with a `result`: `ok`, or what went wrong, folded
from OpenSSL's reason into a few names an operator can act on (`RESULTS`), and logged with OpenSSL's
own reason. A finished handshake also counts its TLS version, whether the session was resumed, and
its time from accept (histogram).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import ssl
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import uvloop
import uvloop.loop

from lbproxy import proxy_protocol

if TYPE_CHECKING:
    from lbproxy.tls import ListenerContexts

log = logging.getLogger("lbproxy.http")

# Upper bounds of the handshake-time histogram, in seconds: from the accept to the handshake's end.
HANDSHAKE_BOUNDS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# The results a handshake ends with, as the metric's label says them. OpenSSL's reason (the
# `reason` of an ssl.SSLError) decides which; one it does not name here is `other`.
RESULTS: Final = (
    "ok",
    "no_shared_cipher",  # the client offers no cipher (or group) the listener allows
    "protocol_version",  # the client's TLS versions are all below min_version, or it is not TLS at all
    "certificate_refused",  # the client refused lbproxy's certificate (unknown CA, bad or expired)
    "client_certificate_missing",  # mutual TLS: the client sent none
    "client_certificate_invalid",  # mutual TLS: the client's certificate does not verify with client_ca
    "plain_http",  # an HTTP request, not a handshake: answered 400
    "not_tls",  # neither TLS nor HTTP: closed
    "timeout",  # no handshake within header_timeout
    "closed",  # the client went away during the handshake
    "other",
)
_REASONS: Final = {
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "WRONG_VERSION_NUMBER": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "TLSV1_ALERT_UNKNOWN_CA": "certificate_refused",
    "SSLV3_ALERT_BAD_CERTIFICATE": "certificate_refused",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate_refused",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate_refused",
    "TLSV1_ALERT_DECRYPT_ERROR": "certificate_refused",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client_certificate_missing",
    "CERTIFICATE_VERIFY_FAILED": "client_certificate_invalid",
    "HTTP_REQUEST": "plain_http",
}

PLAIN_HTTP: Final = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 25\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"plain HTTP to a TLS port\n"
)

WAITING: Final = 0
HANDSHAKE: Final = 1
DONE: Final = 2


class Handshakes:
    """One TLS listener's handshakes, counted: what metrics read and the workers sum."""

    __slots__ = ("results", "versions", "resumed", "durations", "duration_sum")

    def __init__(self) -> None:
        self.results = dict.fromkeys(RESULTS, 0)
        self.versions: dict[str, int] = {}  # finished handshakes by TLS version ("TLSv1.3")
        self.resumed = 0  # finished handshakes that resumed a session
        self.durations = [0] * (len(HANDSHAKE_BOUNDS) + 1)  # finished ones, not cumulative; last: +Inf
        self.duration_sum = 0.0

    def finished(self, version: str, resumed: bool, seconds: float) -> None:
        self.results["ok"] += 1
        self.versions[version] = self.versions.get(version, 0) + 1
        self.resumed += resumed
        self.durations[bisect_left(HANDSHAKE_BOUNDS, seconds)] += 1
        self.duration_sum += seconds

    def numbers(self) -> dict[str, Any]:
        """These counts as plain data: a worker's report, which the supervisor sums."""
        return {
            "results": dict(self.results),
            "versions": dict(self.versions),
            "resumed": self.resumed,
            "durations": list(self.durations),
            "duration_sum": self.duration_sum,
        }

    def state(self) -> dict[str, object]:
        """For the admin API: the results seen, the versions, the resumed ones."""
        return {
            "results": {result: count for result, count in self.results.items() if count},
            "versions": dict(self.versions),
            "resumed": self.resumed,
        }

    @classmethod
    def of(cls, numbers: dict[str, Any]) -> Handshakes:
        """Counts from `numbers` (the workers' reports, summed)."""
        made = cls()
        made.results.update(numbers["results"])
        made.versions = dict(numbers["versions"])
        made.resumed = numbers["resumed"]
        made.durations = list(numbers["durations"])
        made.duration_sum = numbers["duration_sum"]
        return made


def result_of(error: BaseException) -> str:
    """The result a failed handshake is counted under."""
    if isinstance(error, ssl.SSLError):
        return _REASONS.get(str(error.reason), "other")
    if isinstance(error, ConnectionAbortedError):  # the SSL protocol's handshake deadline
        return "timeout"
    if isinstance(error, OSError):
        return "closed"
    return "other"


class Served(Protocol):
    """What the acceptor needs of an http listener: its settings, its counts, its protocol factory."""

    name: str
    loop: asyncio.AbstractEventLoop
    header_timeout: float
    accept_proxy: bool
    bad_proxy_headers: int
    accepting: set[Any]  # the connections still in their first phase: the listener's tick expires them

    @property
    def handshakes(self) -> Handshakes | None: ...

    def __call__(self) -> asyncio.BaseProtocol: ...

    def proxied(self, protocol: Any, client: bytes) -> None: ...


class Acceptor:
    """The protocol factory of a TLS listener's socket: one `Accepting` per connection."""

    __slots__ = ("listener", "contexts", "handshakes", "ssl_protocol")

    def __init__(self, listener: Served, contexts: ListenerContexts) -> None:
        self.listener = listener
        self.contexts = contexts  # reloaded in place: a new handshake gets the new certificates
        handshakes = listener.handshakes
        assert handshakes is not None, "a TLS listener counts its handshakes"
        self.handshakes = handshakes
        # uvloop's SSL protocol is compiled and expects a uvloop loop; asyncio's is its pure-Python twin.
        self.ssl_protocol: Any = (
            getattr(uvloop.loop, "SSLProtocol")  # noqa: B009 (compiled: its stub does not list it)
            if isinstance(listener.loop, uvloop.Loop)
            else asyncio.sslproto.SSLProtocol
        )

    def __call__(self) -> Accepting:
        return Accepting(self)


class Accepting(asyncio.Protocol):
    """One connection of a TLS listener until its handshake is over (see the module's phases)."""

    __slots__ = ("acceptor", "transport", "phase", "started", "deadline", "proxy_header", "proxied", "app")

    def __init__(self, acceptor: Acceptor) -> None:
        self.acceptor = acceptor
        self.transport: asyncio.Transport | None = None
        self.phase = WAITING
        self.started = 0.0
        self.deadline = 0.0  # checked by the listener's tick, as a connection's: no timer per accept
        self.proxy_header = proxy_protocol.HeaderReader() if acceptor.listener.accept_proxy else None
        self.proxied: bytes | None = None  # the client's address from a PROXY header
        self.app: asyncio.BaseProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        listener = self.acceptor.listener
        self.started = time.monotonic()
        self.deadline = listener.loop.time() + listener.header_timeout
        listener.accepting.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == WAITING:
            self._end("closed")

    def deadline_passed(self) -> None:
        if self.phase == WAITING:
            self._end("timeout", "sent no TLS handshake within header_timeout: closed")
            self._abort()

    def close_now(self) -> None:
        """Shutting down: a connection that has not begun its handshake is closed."""
        if self.phase == WAITING:
            self._end("closed")
            self._abort()

    def data_received(self, data: bytes) -> None:
        if self.phase != WAITING:
            return
        header = self.proxy_header
        if header is not None:
            try:
                rest = header.feed(data)
            except proxy_protocol.ProxyHeaderError as error:
                listener = self.acceptor.listener
                listener.bad_proxy_headers += 1
                log.info("listener %s: closing %s: %s", listener.name, self._client(), error)
                self._end("not_tls")
                self._abort()
                return
            if rest is None:
                return
            self.proxy_header = None
            if header.client is not None:
                self.proxied = header.client[0].encode()
            if not rest:
                return
            data = rest
        first = data[0]
        if first == 22:  # a TLS handshake record
            self._handshake(data)
        elif 65 <= first <= 90:  # the letter a method starts with: plain HTTP
            self._refuse("plain_http", "sent plain HTTP to this TLS port: answered 400")
        else:
            self._refuse("not_tls", f"sent neither TLS nor HTTP (first byte {first:#04x}): closed")

    def _handshake(self, data: bytes) -> None:
        acceptor = self.acceptor
        listener = acceptor.listener
        transport = self.transport
        assert transport is not None
        self.phase = HANDSHAKE
        listener.accepting.discard(self)
        app = self.app = listener()
        waiter = listener.loop.create_future()
        waiter.add_done_callback(self._handshake_over)
        secure = acceptor.ssl_protocol(
            listener.loop,
            app,
            acceptor.contexts.context,
            waiter,
            server_side=True,
            # the rest of the same deadline, kept by the SSL protocol's own timer
            ssl_handshake_timeout=max(listener.header_timeout - (time.monotonic() - self.started), 0.001),
        )
        # As loop.start_tls does, with the bytes already read given back to the SSL protocol first
        # (one read is at most 256 KiB, which its buffer takes whole).
        transport.pause_reading()
        transport.set_protocol(secure)
        secure.connection_made(transport)
        while data and self.phase == HANDSHAKE:
            buffer = secure.get_buffer(len(data))
            size = min(len(buffer), len(data))
            buffer[:size] = data[:size]
            secure.buffer_updated(size)
            data = data[size:]
        if not transport.is_closing():
            transport.resume_reading()

    def _handshake_over(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            return
        error = waiter.exception()
        if error is not None:
            result = result_of(error)
            reason = getattr(error, "reason", None) or error.__class__.__name__
            self._end(result, f"TLS handshake failed: {result.replace('_', ' ')} ({reason})")
            return
        self.phase = DONE
        app = self.app
        self.app = None
        transport = getattr(app, "transport", None)
        secured = transport.get_extra_info("ssl_object") if transport is not None else None
        if secured is None:  # gone before its first callback
            self.acceptor.handshakes.results["closed"] += 1
            return
        if self.proxied is not None:
            # The SSL protocol calls back before it hands the protocol its first bytes (as
            # loop.start_tls promises): the address is in place before any request is read.
            self.acceptor.listener.proxied(app, self.proxied)
        seconds = time.monotonic() - self.started
        self.acceptor.handshakes.finished(secured.version() or "unknown", secured.session_reused, seconds)

    def _refuse(self, result: str, why: str) -> None:
        transport = self.transport
        assert transport is not None
        if result == "plain_http":
            transport.write(PLAIN_HTTP)
        self._end(result, why)
        transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _end(self, result: str, why: str = "") -> None:
        if self.phase == DONE:
            return
        self.phase = DONE
        self.app = None
        listener = self.acceptor.listener
        listener.accepting.discard(self)
        self.acceptor.handshakes.results[result] += 1
        if why and log.isEnabledFor(logging.INFO):
            log.info("listener %s: %s %s", listener.name, self._client(), why)

    def _client(self) -> str:
        """The client's address, for a log line: the PROXY header's, else the socket's."""
        if self.proxied is not None:
            return self.proxied.decode()
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if peer else "unknown"
