"""Connections from lbproxy to the servers: where they go, opening them with a timeout, keeping idle ones.

An `Endpoint` is where a connection to a server goes: its resolved address and port, and, for a
pool with `tls`, the pool's TLS context and the SNI name (the PROXY header may join them), so that
connections differing in any of them are never mixed. The proxies' connections and the health
probes reach a server at the same endpoint. Each endpoint has a bounded stack of idle keep-alive
connections (aiohttp's connector is the model): the most recently used one is taken first, and one
that is closing or has been idle longer than the idle timeout is closed instead of reused. The
module is generic over the protocol class, so the HTTP proxy owns what is spoken on a connection and
this module only owns their lifetime.
"""

from __future__ import annotations

import asyncio
import ssl
from abc import abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Generic, NamedTuple, Protocol, TypeVar

from mypy_extensions import trait


class Endpoint(NamedTuple):
    """Where connections to a server go; idle connections are kept per endpoint."""

    host: str  # an address: the runtime resolved the server's name
    port: int
    tls: ssl.SSLContext | None = None  # the pool's context: TLS to the server (compared by identity)
    server_name: str | None = None  # with tls: the SNI name and the name its certificate must have

    def url_host(self) -> str:
        """The host as a URL names it (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host


@trait
class Reusable:
    """What the idle stack needs of a connection's protocol (a trait: see `request_head.Settings`)."""

    __slots__ = ()

    @abstractmethod
    def is_open(self) -> bool:
        raise NotImplementedError

    @abstractmethod
    def close(self) -> None:
        raise NotImplementedError


C = TypeVar("C", bound=Reusable)
P = TypeVar("P", bound=asyncio.Protocol)


class IdleConnections(Generic[C]):
    """The idle keep-alive connections to one server, most recently used last."""

    __slots__ = ("_idle", "max_idle", "idle_timeout")

    def __init__(self, max_idle: int, idle_timeout: float) -> None:
        self._idle: deque[tuple[C, float]] = deque()
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout

    def get(self, now: float) -> C | None:
        """A connection ready for a request, or None when a new one must be opened."""
        idle = self._idle
        while idle:
            connection, since = idle.pop()
            if connection.is_open() and now - since < self.idle_timeout:
                return connection
            connection.close()
        return None

    def put(self, connection: C, now: float) -> bool:
        """Keep `connection` for reuse; False when the stack is full (the caller closes it)."""
        if len(self._idle) >= self.max_idle:
            return False
        self._idle.append((connection, now))
        return True

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than the timeout (oldest are at the left)."""
        idle = self._idle
        while idle and (now - idle[0][1] >= self.idle_timeout or not idle[0][0].is_open()):
            idle.popleft()[0].close()

    def entries(self) -> list[tuple[C, float]]:
        return list(self._idle)

    def close_all(self) -> None:
        while self._idle:
            self._idle.pop()[0].close()

    def __len__(self) -> int:
        return len(self._idle)


class Target(Protocol):
    """What `dial` needs of a server: where it is, and where to count a failed connect and a handshake."""

    endpoint: Endpoint
    connect_failures: int
    tls_handshakes: int
    tls_resumptions: int


async def dial(loop: asyncio.AbstractEventLoop, factory: Callable[[], P], target: Target, timeout: float) -> P | str:
    """A new connection to `target`, for both proxies: its protocol, or why none opened within
    `timeout` seconds (counted on the target). What follows a failure (another server, an error to
    the client) is the caller's: the rule is `selection.retry_elsewhere`."""
    endpoint = target.endpoint
    try:
        async with asyncio.timeout(timeout):
            transport, protocol = await loop.create_connection(
                factory, endpoint.host, endpoint.port, ssl=endpoint.tls, server_hostname=endpoint.server_name
            )
        if endpoint.tls is not None:
            target.tls_handshakes += 1
            secured = transport.get_extra_info("ssl_object")
            if secured is not None and secured.session_reused:
                target.tls_resumptions += 1
        return protocol
    except TimeoutError:
        reason = "connect timeout"
    except ssl.SSLCertVerificationError as error:
        reason = f"certificate verify failed: {error.verify_message}"
    except OSError as error:
        reason = f"connect failed: {error}"
    target.connect_failures += 1
    return reason
