"""flow.Outbox on a real loopback connection: small writes wait for the loop to turn, in order.

Loopback TCP hands a sent segment to the receiving socket within the send call, so a non-blocking
recv() on the far end tells, without any timing, whether a write has reached the kernel yet.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from lbproxy import flow
from tests.support import LOCALHOST, eventually


class Lost(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@pytest.fixture
async def pair() -> AsyncIterator[tuple[asyncio.Transport, socket.socket]]:
    """A transport on the running loop and, blocking-free, the raw socket at its other end."""
    loop = asyncio.get_running_loop()
    with socket.create_server((LOCALHOST, 0)) as listening:
        transport, _ = await loop.create_connection(Lost, *listening.getsockname())
        accepted, _ = listening.accept()  # the handshake is done: accept() does not block
    accepted.setblocking(False)
    try:
        yield transport, accepted  # type: ignore[misc]
    finally:
        transport.abort()
        accepted.close()


def received(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return b""


async def test_small_writes_wait_for_the_loop_and_keep_their_order(
    pair: tuple[asyncio.Transport, socket.socket],
) -> None:
    transport, far = pair
    outbox = flow.Outbox(asyncio.get_running_loop())
    outbox.write(transport, b"one ")
    outbox.write(transport, b"two ")
    assert received(far) == b""  # held
    got = bytearray()

    def arrived() -> bool:
        got.extend(received(far))
        return bytes(got) == b"one two "

    await eventually(arrived, what="the held writes, once the loop turned")
    assert outbox.pending == []


async def test_a_large_write_goes_at_once_after_what_is_pending(
    pair: tuple[asyncio.Transport, socket.socket],
) -> None:
    transport, far = pair
    outbox = flow.Outbox(asyncio.get_running_loop())
    big = bytes(range(256)) * (flow.OUTBOX_BULK // 256)
    outbox.write(transport, b"small ")
    outbox.write(transport, big)
    got = bytearray()
    for _ in range(100):  # no loop turn in between: all of it is in the kernel already
        more = received(far)
        if not more:
            break
        got += more
    assert bytes(got) == b"small " + big


async def test_flush_writes_now_and_skips_a_closed_transport(
    pair: tuple[asyncio.Transport, socket.socket],
) -> None:
    transport, far = pair
    protocol = transport.get_protocol()
    assert isinstance(protocol, Lost)
    outbox = flow.Outbox(asyncio.get_running_loop())
    outbox.write(transport, b"before close")
    outbox.flush()
    assert received(far) == b"before close"
    transport.abort()
    await eventually(lambda: protocol.lost, what="connection_lost after abort()")
    outbox.write(transport, b"dropped")
    outbox.flush()  # uvloop raises on a write to a closed transport: it is skipped
    assert outbox.pending == []


class Leg:
    """A client leg's deadline, as a relay keeps it ahead."""

    deadline = 0.0

    def deadline_passed(self) -> None:
        raise AssertionError("not in these tests")


class Counts:
    sent_bytes = 0
    received_bytes = 0


@pytest.fixture
async def two_pairs() -> AsyncIterator[tuple[tuple[asyncio.Transport, socket.socket], ...]]:
    """Two loopback connections: lbproxy's client leg and server leg, each with its far end."""
    loop = asyncio.get_running_loop()
    made = []
    with socket.create_server((LOCALHOST, 0)) as listening:
        for _ in range(2):
            transport, _ = await loop.create_connection(Lost, *listening.getsockname())
            accepted, _ = listening.accept()
            accepted.setblocking(False)
            made.append((transport, accepted))
    try:
        yield tuple(made)  # type: ignore[misc]
    finally:
        for transport, accepted in made:
            transport.abort()
            accepted.close()


@pytest.mark.parametrize("with_outbox", [False, True], ids=["l4", "tunnel"])
async def test_a_relay_counts_moves_keeps_the_deadline_and_passes_half_closes_on(
    two_pairs: tuple[tuple[asyncio.Transport, socket.socket], ...], with_outbox: bool
) -> None:
    (client, client_far), (server, server_far) = two_pairs
    loop = asyncio.get_running_loop()
    leg, counts = Leg(), Counts()
    outbox = flow.Outbox(loop) if with_outbox else None
    relay = flow.Relay(loop, client, server, leg, 30.0, counts, outbox)  # type: ignore[arg-type]

    relay.from_client(b"request")
    relay.from_server(b"answer!!")
    assert leg.deadline >= loop.time() + 29.0
    assert (counts.sent_bytes, counts.received_bytes) == (7, 8)
    # The client's EOF goes after its bytes (an outbox is flushed first), and the other way stays open.
    relay.from_client(b" more")
    assert relay.client_ended()
    got = bytearray()

    def server_got_eof() -> bool:
        while True:
            try:
                more = server_far.recv(1 << 16)
            except BlockingIOError:
                return False
            if not more:
                return True
            got.extend(more)

    await eventually(server_got_eof, what="the client's bytes, then its EOF, at the server")
    assert bytes(got) == b"request more"
    relay.from_server(b" still")
    if outbox is not None:
        outbox.flush()
    answer = bytearray()

    def client_got_all() -> bool:
        answer.extend(received(client_far))
        return bytes(answer) == b"answer!! still"

    await eventually(client_got_all, what="the server's bytes, those after the client's EOF too")
    # The server ends too: both ways are done, the caller closes the legs.
    assert not relay.server_ended()


async def test_a_relay_says_done_when_the_other_side_cannot_be_half_closed(
    two_pairs: tuple[tuple[asyncio.Transport, socket.socket], ...],
) -> None:
    (client, _), (server, _) = two_pairs
    relay = flow.Relay(asyncio.get_running_loop(), client, server, Leg(), 30.0, Counts())  # type: ignore[arg-type]
    server.close()
    assert not relay.client_ended()  # the server leg is closing: nothing to pass the EOF to
