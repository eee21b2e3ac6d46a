"""The L4 proxy: each accepted connection relayed to a server its pool picks, bytes both ways.

Two `asyncio.Protocol`s per connection, `TcpClient` facing the client and `TcpServer` facing the
server; once the server connection is open, a `flow.Relay` moves the bytes (the same relay as an L7
tunnel's): no parsing, no copies beyond what the transports need, back-pressure both ways through
flow.ReadGate, half-close honoured. A connect failure or timeout tries another server (up to the
pool's `retries`, `selection.retry_elsewhere`) and is reported to passive detection. With
`accept_proxy` the connection must open with a PROXY header; with the pool's `send_proxy` lbproxy
writes one to the server.

This module reads its settings from a `TcpListener` that the runtime builds, never the config file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, cast

from lbproxy import flow, proxy_protocol
from lbproxy.pool import Pool, Server
from lbproxy.selection import must_wait, retry_elsewhere, select, waits_for
from lbproxy.upstream import dial

if TYPE_CHECKING:
    from lbproxy.limits import Ticket

log = logging.getLogger("lbproxy.tcp")

MAX_EARLY: Final = 256 * 1024  # client bytes held while the server connection opens (reading pauses)
PROXY_HEADER_TIMEOUT: Final = 10.0  # with accept_proxy, the header must come within this, as HAProxy's


class TcpListener:
    """What the connections of one tcp listener share: settings, the pool, counters."""

    mode: Final = "tcp"

    __slots__ = (
        "name",
        "pool",
        "loop",
        "max_connections",
        "idle_timeout",
        "connect_timeout",
        "accept_proxy",
        "send_proxy",
        "connections",
        "connections_total",
        "rejected",
        "unavailable",
        "bad_proxy_headers",
        "retries",
    )

    def __init__(
        self,
        name: str,
        pool: Pool,
        *,
        loop: asyncio.AbstractEventLoop,
        max_connections: int = 10_000,
        idle_timeout: float = 3600.0,
        connect_timeout: float = 5.0,
        accept_proxy: bool = False,
        send_proxy: str | None = None,
    ) -> None:
        self.name = name
        self.pool = pool
        self.loop = loop
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.accept_proxy = accept_proxy
        self.send_proxy = send_proxy
        self.connections: set[TcpClient] = set()
        # counters, read at scrape time
        self.connections_total = 0
        self.rejected = 0  # over max_connections
        self.unavailable = 0  # closed at once: no server available
        self.bad_proxy_headers = 0
        self.retries = 0

    def __call__(self) -> TcpClient:
        return TcpClient(self)

    def reconfigure(self, other: TcpListener) -> None:
        """Take the settings of `other` (built from a reloaded config), keeping counters and connections."""
        for name in ("pool", "max_connections", "idle_timeout", "connect_timeout", "accept_proxy", "send_proxy"):
            setattr(self, name, getattr(other, name))

    def tick(self, now: float) -> None:
        """Close connections idle past idle_timeout; the runtime calls this a few times a second."""
        flow.expire(self.connections, now)

    def close_idle(self) -> None:
        pass  # no idle server connections in tcp mode

    def cut_server(self, server: Server) -> int:
        """Close every relayed connection to `server`; returns how many."""
        cut = [connection for connection in self.connections if connection.server is server]
        for connection in cut:
            if connection.transport is not None:
                connection.transport.abort()
        return len(cut)

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    def state(self) -> dict[str, object]:
        """Counters for the admin API."""
        return {
            "mode": "tcp",
            "pool": self.pool.name,
            "active_connections": len(self.connections),
            "counters": {
                "connections": self.connections_total,
                "rejected": self.rejected,
                "unavailable": self.unavailable,
                "bad_proxy_headers": self.bad_proxy_headers,
                "retries": self.retries,
            },
        }


class TcpClient(asyncio.Protocol):
    """The client leg of one relayed connection."""

    __slots__ = (
        "listener",
        "transport",
        "gate",
        "server",
        "upstream",
        "relay",
        "early",
        "early_size",
        "client",
        "local",
        "proxy_header",
        "tried",
        "deadline",
        "eof",
        "closed",
        "ticket",
    )

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.gate: flow.ReadGate | None = None
        self.server: Server | None = None
        self.upstream: TcpServer | None = None
        self.relay: flow.Relay | None = None  # once the server connection is open
        self.early: list[bytes] = []  # client bytes before the server connection is open
        self.early_size = 0
        self.client: proxy_protocol.Address = ("", 0)
        self.local: proxy_protocol.Address = ("", 0)
        # with accept_proxy, until the PROXY header is read
        self.proxy_header = proxy_protocol.HeaderReader() if listener.accept_proxy else None
        self.tried: tuple[Server, ...] = ()  # servers whose connect failed, for a retry elsewhere
        self.deadline = 0.0
        self.eof = False  # the client shut down its writing
        self.closed = False
        self.ticket: Ticket[Server] | None = None  # waiting in the pool's queue for a server's slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        listener = self.listener
        self.transport = transport
        self.gate = flow.admit(listener, self, transport)
        if self.gate is None:
            self.closed = True
            return
        self.client = _address(transport.get_extra_info("peername"))
        self.local = _address(transport.get_extra_info("sockname"))
        self.touch()
        if self.proxy_header is not None:
            self.deadline = listener.loop.time() + min(listener.idle_timeout, PROXY_HEADER_TIMEOUT)
        else:
            self._connect()

    def touch(self) -> None:
        self.deadline = self.listener.loop.time() + self.listener.idle_timeout

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.from_client(data)
            return
        if self.proxy_header is not None:
            self._read_proxy_header(data)
            return
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size > MAX_EARLY and self.gate is not None:
            self.gate.pause(flow.WAITING)

    def _read_proxy_header(self, data: bytes) -> None:
        """Take the PROXY header off the connection's first bytes; then connect, with what followed it."""
        header = self.proxy_header
        assert header is not None
        try:
            rest = header.feed(data)
        except proxy_protocol.ProxyHeaderError as error:
            self.listener.bad_proxy_headers += 1
            log.info("listener %s: closing %s: %s", self.listener.name, self.client[0], error)
            self.close()
            return
        if rest is None:
            return
        if header.client is not None and header.destination is not None:
            self.client = header.client  # forwarded as received, as HAProxy does
            self.local = header.destination
        self.proxy_header = None
        self.early = [rest] if rest else []
        self.early_size = len(rest)
        self._connect()

    def eof_received(self) -> bool:
        self.eof = True
        relay = self.relay
        if relay is not None:
            if not relay.client_ended() and self.upstream is not None:
                self.upstream.close()  # both ways done: its loss closes this leg
            return True
        return self.server is not None  # still connecting: the EOF is passed on once connected

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        if self.ticket is not None:  # it leaves the queue where it stands
            self.ticket.cancel()
            self.ticket = None
        upstream = self.upstream
        if upstream is not None:
            upstream.close()
        elif self.server is not None:
            self._release()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.gate is not None:
            self.upstream.gate.pause(flow.PEER_BUSY)

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.gate is not None:
            self.upstream.gate.resume(flow.PEER_BUSY)

    # -- the server side --

    def _connect(self) -> None:
        pool = self.listener.pool
        # source_ip persistence (the only kind a tcp listener takes): the client's address is the key
        key = self.client[0].encode() if pool.persistence is not None else None
        server = select(pool, None, self.tried, key)
        if server is None:
            self.listener.unavailable += 1
            self.close()
            return
        if server.pool.queue is not None and must_wait(server):
            self._wait(server, key)
            return
        self.server = server
        server.pool.taken(server)
        self._opening(server)

    def _opening(self, server: Server) -> None:
        if self.gate is not None:
            self.gate.pause(flow.WAITING)
        self.listener.loop.create_task(self._open(server))

    def _wait(self, server: Server, key: bytes | None) -> None:
        """Every server is at its limit: the connection waits in the pool's queue until a server's
        slot is its (then it connects), the queue's timeout or its client leaves (then it is closed)."""
        pool = server.pool
        queue = pool.queue
        assert queue is not None
        ticket = queue.join(self._dequeued, waits_for(pool, key, server), time.monotonic())
        if ticket is None:
            self.listener.unavailable += 1
            log.info(
                "listener %s: %s finds pool %s's queue full: closed", self.listener.name, self.client[0], pool.name
            )
            self.close()
            return
        self.ticket = ticket
        # Reading goes on (what the client sends is held, up to MAX_EARLY): its EOF is seen at once
        self.deadline = self.listener.loop.time() + queue.timeout

    def _dequeued(self, server: Server | None) -> None:
        """The queue's answer: `server`'s slot is this connection's, or None: choose again."""
        self.ticket = None
        if self.closed:
            if server is not None:
                server.pool.released(server)
            return
        self.touch()
        if server is None:
            self._connect()
            return
        self.server = server
        self._opening(server)

    async def _open(self, server: Server) -> None:
        listener = self.listener
        upstream = await dial(listener.loop, lambda: TcpServer(self, server), server, listener.connect_timeout)
        if isinstance(upstream, str):
            reason = upstream
            self._release()
            server.pool.report_failure(server, reason)
            if self.closed:
                return
            if retry_elsewhere(len(self.tried), listener.pool.retries, reached=False, idempotent=False):
                self.tried += (server,)
                listener.retries += 1
                listener.pool.retried += 1
                self._connect()
            else:
                log.warning("listener %s: no server answered for %s: %s", listener.name, self.client[0], reason)
                self.close()
            return
        if self.closed:
            upstream.close()
            return
        if server.consecutive_failures:
            server.consecutive_failures = 0
        relay = upstream.relay
        assert relay is not None  # made as the connection was
        self.upstream = upstream
        if listener.send_proxy == "v1":
            relay.from_client(proxy_protocol.header_v1(self.client, self.local))
        elif listener.send_proxy == "v2":
            relay.from_client(proxy_protocol.header_v2(self.client, self.local))
        if self.early:
            relay.from_client(b"".join(self.early))
            self.early = []
            self.early_size = 0
        self.relay = relay
        if self.eof and not relay.client_ended():
            upstream.close()
        if self.gate is not None:
            self.gate.resume(flow.WAITING)

    def _release(self) -> None:
        server = self.server
        if server is not None:
            self.server = None
            server.pool.released(server)

    def server_closed(self) -> None:
        """The server connection is gone: the relay ends."""
        self.upstream = None
        self._release()
        self.close()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.close()
            if transport.get_write_buffer_size():
                # Open until its last bytes are read, so still counted; aborted at the deadline.
                self.deadline = self.listener.loop.time() + flow.CLOSE_LINGER
                return
        self.listener.connections.discard(self)

    def deadline_passed(self) -> None:
        """Idle for idle_timeout: closed; closed and still not drained after CLOSE_LINGER: aborted;
        waited the queue's timeout: closed, counted."""
        ticket = self.ticket
        if ticket is not None:
            self.ticket = None
            ticket.timed_out()
            self.listener.unavailable += 1
            log.info("listener %s: %s waited the queue's timeout: closed", self.listener.name, self.client[0])
            self.close()
            return
        if self.closed and self.transport is not None:
            self.transport.abort()
        else:
            self.close()


class TcpServer(asyncio.Protocol):
    """The server leg of one relayed connection."""

    __slots__ = ("client", "server", "transport", "gate", "relay")

    def __init__(self, client: TcpClient, server: Server) -> None:
        self.client = client
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.gate: flow.ReadGate | None = None
        self.relay: flow.Relay | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        flow.set_limits(transport)
        self.gate = flow.ReadGate(transport)
        client = self.client
        assert client.transport is not None  # a client leg connects only once it is made
        # The server may speak first (a banner), before the client leg has heard the connection is open.
        listener = client.listener
        self.relay = flow.Relay(listener.loop, client.transport, transport, client, listener.idle_timeout, self.server)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None and not self.client.closed:
            relay.from_server(data)

    def eof_received(self) -> bool:
        relay = self.relay
        return relay is not None and relay.server_ended()  # False: both ways done, close

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.server_closed()

    def pause_writing(self) -> None:
        if self.client.gate is not None:
            self.client.gate.pause(flow.PEER_BUSY)

    def resume_writing(self) -> None:
        if self.client.gate is not None:
            self.client.gate.resume(flow.PEER_BUSY)

    def close(self) -> None:
        if self.transport is not None:
            flow.linger(self.client.listener.loop, self.transport)


def _address(info: object) -> proxy_protocol.Address:
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return ("", 0)
