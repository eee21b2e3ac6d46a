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
