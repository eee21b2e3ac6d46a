"""How bytes move between the two legs of a relay: back-pressure, and when writes are made.

When one leg's transport says its write buffer is above the high-water mark (`pause_writing`), the
other leg stops reading until it drains (`resume_writing`). Reading on a leg can be paused for
several reasons at once (the peer is slow, a pipelined request waits its turn, a server connection is
being opened); a `ReadGate` resumes only when the last reason is gone. An `Outbox` holds the small
writes of one event-loop iteration and makes them together at its end. Nothing here holds data longer.
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
