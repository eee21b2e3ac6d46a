"""How bytes move between the two legs of a relay: back-pressure, half-close, and when writes are made.

When one leg's transport says its write buffer is above the high-water mark (`pause_writing`), the
other leg stops reading until it drains (`resume_writing`). Reading on a leg can be paused for
several reasons at once (the peer is slow, a pipelined request waits its turn, a server connection is
being opened); a `ReadGate` resumes only when the last reason is gone. An `Outbox` holds the small
writes of one event-loop iteration and makes them together at its end. Nothing here holds data longer.

A `Relay` is the one byte relay of both proxies: an L4 connection once its server connection is
open, and an L7 connection after the server switched protocols (101). The protocols feed it their
reads and EOFs; it counts, writes, keeps the client leg's deadline ahead and passes half-closes on.
The legs' openings, closings and lingers (`admit`, `linger`, `expire`) are here too, shared alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final, Protocol

# uvloop's default low-water mark differs from CPython's: set both on every transport, the same way.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024

PEER_BUSY: Final = 1  # the other leg cannot take more data
WAITING: Final = 2  # this leg's next data has nowhere to go yet (pipelining, connecting)

OUTBOX_BULK: Final = 16 * 1024  # an Outbox writes this much or more at once

# How long a connection that lbproxy closed may take to deliver its last bytes before it is aborted:
# a peer that does not read would otherwise hold its descriptor for ever, uncounted.
CLOSE_LINGER: Final = 2.0


def linger(loop: asyncio.AbstractEventLoop, transport: asyncio.WriteTransport) -> None:
    """Close `transport` once its buffered bytes are out, or abort it after CLOSE_LINGER.

    For the server legs, which no deadline of a listener watches.
    """
    transport.close()
    if transport.get_write_buffer_size():
        loop.call_later(CLOSE_LINGER, transport.abort)


def set_limits(transport: asyncio.WriteTransport) -> None:
    transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)


class Listening(Protocol):
    """What `admit` counts on, in an http or tcp listener."""

    connections: set[Any]
    connections_total: int
    rejected: int
    max_connections: int


class Counted(Protocol):
    """Where a relay counts the bytes it moves: the server (sent to it, received from it)."""

    sent_bytes: int
    received_bytes: int


class Timed(Protocol):
    """A client leg with one deadline (0: none) and what to do when it passes."""

    deadline: float

    def deadline_passed(self) -> None: ...


def expire(connections: Iterable[Timed], now: float) -> None:
    """Act on every connection whose deadline has passed: the listeners' tick, the same for both proxies.

    Deadlines are stored, never scheduled: the hot path creates and cancels no timer.
    """
    for connection in list(connections):
        deadline = connection.deadline
        if deadline and now >= deadline:
            connection.deadline_passed()


def admit(listener: Listening, connection: object, transport: asyncio.Transport) -> ReadGate | None:
    """A client leg's first step, the same in both proxies: count the connection and, over
    `max_connections`, abort it (None); else it is open, counted until it is gone, with the
    buffer limits set and a gate on its reading."""
    listener.connections_total += 1
    if len(listener.connections) >= listener.max_connections:
        listener.rejected += 1
        transport.abort()
        return None
    listener.connections.add(connection)
    set_limits(transport)
    return ReadGate(transport)


class ReadGate:
    """Reading from one transport, paused while any reason holds."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.ReadTransport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            try:
                self.transport.pause_reading()
            except RuntimeError:  # already closing
                pass
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                try:
                    self.transport.resume_reading()
                except RuntimeError:
                    pass


class Outbox:
    """Writes held until every callback of this event-loop iteration has run, then made in a burst.

    Each write wakes the process reading the other end. Made as the reads are handled, one at a
    time, they wake a peer that has gone back to sleep in between, again and again; on a virtual
    machine each such wake-up of another core costs several microseconds of the writer's system
    time. Made together once the iteration's reads are handled, the first write wakes the peer and
    the rest find it awake, as in HAProxy, which sends only after handling all the events of a poll.

    A large write is made at once, after what is pending: it gains nothing from waiting, and its
    transport must see it at once to apply back-pressure (uvloop reads a busy socket up to 32 times
    in one iteration). Every write to a transport must go through the outbox, so that its bytes keep
    their order, and the outbox must be flushed before the transport is closed.
    """

    __slots__ = ("loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[asyncio.WriteTransport, bytes]] = []

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        if len(data) >= OUTBOX_BULK:
            self.flush()
            transport.write(data)
            return
        pending = self.pending
        if not pending:
            # call_soon runs after the I/O callbacks of the current iteration, before the next poll.
            self.loop.call_soon(self.flush)
        pending.append((transport, data))

    def flush(self) -> None:
        pending = self.pending
        if pending:
            self.pending = []
            for transport, data in pending:
                if not transport.is_closing():
                    transport.write(data)


class Relay:
    """Bytes both ways between a client leg and a server leg, untouched, until both ways are done.

    Every byte either way keeps the client leg's deadline `timeout` ahead (the idle timeout of an L4
    connection, `tunnel_timeout` of a tunnel). An EOF from one side becomes a `write_eof` on the
    other, and the other way flows on until it ends too (`client_ended`, `server_ended` say False
    when the relay is over and the legs are to be closed). Writes go through the L7 listener's
    outbox, so that they keep their order after the response head; the L4 proxy writes at once.
    """

    __slots__ = ("loop", "client", "server", "timed", "timeout", "counts", "outbox", "client_eof", "server_eof")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: asyncio.WriteTransport,
        server: asyncio.WriteTransport,
        timed: Timed,
        timeout: float,
        counts: Counted,
        outbox: Outbox | None = None,
    ) -> None:
        self.loop = loop
        self.client = client
        self.server = server
        self.timed = timed
        self.timeout = timeout
        self.counts = counts
        self.outbox = outbox
        self.client_eof = False
        self.server_eof = False

    def from_client(self, data: bytes) -> None:
        self.counts.sent_bytes += len(data)
        self._write(self.server, data)
        self.timed.deadline = self.loop.time() + self.timeout

    def from_server(self, data: bytes) -> None:
        self.counts.received_bytes += len(data)
        self._write(self.client, data)
        self.timed.deadline = self.loop.time() + self.timeout

    def client_ended(self) -> bool:
        """The client shut its writing: the server is told. False when both ways are now done."""
        self.client_eof = True
        return self._pass_eof(self.server, self.server_eof)

    def server_ended(self) -> bool:
        """The server shut its writing: the client is told. False when both ways are now done."""
        self.server_eof = True
        return self._pass_eof(self.client, self.client_eof)

    def _write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        outbox = self.outbox
        if outbox is not None:
            outbox.write(transport, data)
        elif not transport.is_closing():
            transport.write(data)

    def _pass_eof(self, transport: asyncio.WriteTransport, other_way_done: bool) -> bool:
        if other_way_done or transport.is_closing() or not transport.can_write_eof():
            return False
        if self.outbox is not None:
            self.outbox.flush()  # what was written before the EOF goes before it
        transport.write_eof()
        return True
