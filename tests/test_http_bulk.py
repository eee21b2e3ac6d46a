"""Big bodies through lbproxy over real sockets: relayed whole, with memory flat (issue #3).

lbproxy runs in this process, with the back-ends and clients, so its memory is the process's: the
resident set size is sampled every 100 ms during each transfer and its growth over the start is
bounded. Back-end and clients are small `asyncio.Protocol`s that keep nothing but counts and a
CRC-32, and respect their own transports' pause_writing/resume_writing, so any growth is lbproxy's.
The receiving end of each transfer has a small socket receive buffer, so it is slower than lbproxy
reads: without back-pressure the difference would pile up in lbproxy.

Sizes: a 1 GiB download, 1 GiB uploads by Content-Length and chunked, and a 256 MiB download whose
client stops reading for a second in the middle (the whole file takes about 12 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import httptools

from lbproxy.runtime import Runtime
from tests.support import LOCALHOST, RssSampler, buffered_for_clients, held_back, port_of, running

P = TypeVar("P", bound=asyncio.Protocol)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
CHUNK = 256 * KiB
BLOCK = random.Random(3).randbytes(CHUNK)  # every body is this block repeated (the last one cut short)
# The receiving end of each transfer is slow-ish: a small socket receive buffer lets it take only this
# much per read, while lbproxy reads up to its own buffer from the sending end. Without back-pressure,
# the difference piles up in lbproxy.
SLOW_RCVBUF = 64 * KiB


@functools.cache
def expected_crc(size: int) -> int:
    crc = 0
    whole, rest = divmod(size, CHUNK)
    for _ in range(whole):
        crc = zlib.crc32(BLOCK, crc)
    return zlib.crc32(BLOCK[:rest], crc)


def lb_config(server: str) -> str:
    return f"""
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    servers:
      - name: a
        address: "{server}"
"""


# -- back-ends ------------------------------------------------------------------------------------


class _Writer(asyncio.Protocol):
    """Writes a body of `size` bytes of BLOCK in CHUNK writes, never past its own transport's limits."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.remaining = 0
        self.paused = False
        self.pauses = 0
        self.paused_event = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.paused = True
        self.pauses += 1
        self.paused_event.set()

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def begin(self, head: bytes, size: int) -> None:
        assert self.transport is not None
        self.remaining = size
        self.transport.write(head)
        self.pump()

    def pump(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.remaining and not self.paused and not transport.is_closing():
            if self.remaining >= CHUNK:
                transport.write(BLOCK)
                self.remaining -= CHUNK
            else:
                transport.write(BLOCK[: self.remaining])
                self.remaining = 0
        if not self.remaining:
            self.done()

    def done(self) -> None:
        """The whole body is in the transport."""


class StreamingServer(_Writer):
    """A back-end answering each request (its body ignored) with 200 and `size` bytes of BLOCK."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.head = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.remaining:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.head.clear()
            self.begin(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size, self.size)


class _BodyCounter:
    """httptools callbacks counting a message body and its CRC-32."""

    def __init__(self) -> None:
        self.count = 0
        self.crc = 0
        self.status = 0
        self.complete = asyncio.get_running_loop().create_future()

    def on_body(self, body: bytes) -> None:
        self.count += len(body)
        self.crc = zlib.crc32(body, self.crc)

    def on_message_complete(self) -> None:
        if not self.complete.done():
            self.complete.set_result(None)


class CountingServer(asyncio.Protocol, _BodyCounter):
    """A back-end that reads a request body, keeping only its size and CRC, then answers `size crc`."""

    def __init__(self) -> None:
        _BodyCounter.__init__(self)
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        assert self.transport is not None
        body = b"%d %08x" % (self.count, self.crc)
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@contextlib.asynccontextmanager
async def serving(factory: Callable[[], asyncio.Protocol]) -> AsyncIterator[tuple[int, list[asyncio.Protocol]]]:
    """A back-end on 127.0.0.1: (its port, the protocol of each accepted connection)."""
    accepted: list[asyncio.Protocol] = []

    def make() -> asyncio.Protocol:
        protocol = factory()
        accepted.append(protocol)
        return protocol

    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)  # inherited by accepted sockets
    listening.bind((LOCALHOST, 0))
    server = await asyncio.get_running_loop().create_server(make, sock=listening)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        for protocol in accepted:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abort()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def proxied(
    tmp_path: Path, factory: Callable[[], asyncio.Protocol]
) -> AsyncIterator[tuple[Runtime, list[asyncio.Protocol]]]:
    async with serving(factory) as (port, accepted), running(lb_config(f"{LOCALHOST}:{port}"), tmp_path) as lb:
        yield lb, accepted


# -- clients --------------------------------------------------------------------------------------


class Downloader(asyncio.Protocol, _BodyCounter):
    """Sends one GET, then reads the response, keeping only its size and CRC."""

    def __init__(self, pause_at: int | None = None) -> None:
        _BodyCounter.__init__(self)
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.half_way: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pause_at = pause_at  # stop reading once this much of the body has come

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.pause_at is not None and self.count >= self.pause_at and not self.half_way.done():
            assert self.transport is not None
            self.transport.pause_reading()
            self.half_way.set_result(None)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()


class Uploader(_Writer, _BodyCounter):
    """Sends one POST with a body of `size` bytes of BLOCK, by Content-Length or chunked, then reads the answer."""

    def __init__(self, size: int, chunked: bool) -> None:
        _Writer.__init__(self)
        _BodyCounter.__init__(self)
        self.size = size
        self.chunked = chunked
        self.parser = httptools.HttpResponseParser(self)
        self.answer = bytearray()
        self.ended = False  # the last chunk is written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        framing = b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % self.size
        self.begin(b"POST /upload HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % framing, self.size)

    def pump(self) -> None:
        if not self.chunked:
            super().pump()
            return
        transport = self.transport
        assert transport is not None
        while self.remaining and not self.paused and not transport.is_closing():
            size = min(CHUNK, self.remaining)
            transport.writelines((b"%x\r\n" % size, BLOCK[:size] if size < CHUNK else BLOCK, b"\r\n"))
            self.remaining -= size
        if not self.remaining and not self.ended:
            self.ended = True
            transport.write(b"0\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.answer += body


async def slow_connection(port: int, factory: Callable[[], P]) -> tuple[asyncio.Transport, P]:
    """A client connection to lbproxy that receives at most SLOW_RCVBUF per read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)  # before connecting: caps the window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (LOCALHOST, port))
    except BaseException:
        sock.close()
        raise
    transport, protocol = await loop.create_connection(factory, sock=sock)
    return transport, protocol


async def download(port: int, timeout: float) -> Downloader:
    transport, client = await slow_connection(port, Downloader)
    try:
        async with asyncio.timeout(timeout):
            await client.complete
    finally:
        transport.close()
    return client


# -- the tests ------------------------------------------------------------------------------------


async def test_1gib_download_through_lbproxy_keeps_memory_flat(tmp_path: Path) -> None:
    size = 1 * GiB
    expected = expected_crc(size)
    async with proxied(tmp_path, functools.partial(StreamingServer, size)) as (lb, _servers):
        started = time.monotonic()
        async with RssSampler() as memory:
            client = await download(port_of(lb), timeout=40.0)
        elapsed = time.monotonic() - started
    assert client.status == 200
    assert client.count == size
    assert client.crc == expected
    assert memory.growth < 100 * MiB, f"RSS grew by {memory.growth / MiB:.1f} MiB in {elapsed:.1f}s"


async def _upload(tmp_path: Path, size: int, chunked: bool) -> None:
    expected = expected_crc(size)
    async with proxied(tmp_path, CountingServer) as (lb, servers):
        async with RssSampler() as memory:
            transport, client = await slow_connection(port_of(lb), functools.partial(Uploader, size, chunked))
            try:
                async with asyncio.timeout(40.0):
                    await client.complete
            finally:
                transport.close()
        assert (client.status, bytes(client.answer)) == (200, b"%d %08x" % (size, expected))
        (server,) = servers
        assert isinstance(server, CountingServer)
        assert (server.count, server.crc) == (size, expected)
    assert memory.growth < 100 * MiB, f"RSS grew by {memory.growth / MiB:.1f} MiB"


async def test_1gib_upload_with_content_length_keeps_memory_flat(tmp_path: Path) -> None:
    await _upload(tmp_path, 1 * GiB, chunked=False)


async def test_1gib_chunked_upload_keeps_memory_flat(tmp_path: Path) -> None:
    await _upload(tmp_path, 1 * GiB, chunked=True)


async def test_reader_pausing_mid_download_holds_the_server_back(tmp_path: Path) -> None:
    size = 256 * MiB
    expected = expected_crc(size)
    loop = asyncio.get_running_loop()
    async with proxied(tmp_path, functools.partial(StreamingServer, size)) as (lb, servers), RssSampler() as memory:
        transport, client = await slow_connection(port_of(lb), functools.partial(Downloader, size // 2))
        try:
            async with asyncio.timeout(30.0):
                await client.half_way
                paused_at = loop.time()
                (server,) = servers
                assert isinstance(server, StreamingServer)
                # back-pressure must reach the server: its transport fills and tells it to stop
                await held_back(server)
                # the client keeps not reading for a second in all
                await asyncio.sleep(max(0.0, paused_at + 1.0 - loop.time()))
                assert server.paused, "the server writes on while the client reads nothing"
                assert server.remaining > 0
                buffered = buffered_for_clients(lb.listeners["web"].connections)
                assert buffered <= 1 * MiB, f"lbproxy holds {buffered} bytes for the client"
                assert transport.is_reading() is False
                transport.resume_reading()
                await client.complete
        finally:
            transport.close()
    assert client.status == 200
    assert (client.count, client.crc) == (size, expected)
    assert memory.growth < 50 * MiB, f"RSS grew by {memory.growth / MiB:.1f} MiB"
