"""The L4 relay seen from real sockets (issue #7): bytes both ways, half-close, back-pressure, failover,
limits, counters, and the PROXY protocol sent to servers and accepted from a balancer in front.

lbproxy runs in this process on 127.0.0.1 (or [::1]) port 0, in front of raw asyncio back-ends written
here: an echo that respects its own transport's back-pressure, a recorder that keeps every byte, a
firehose, and a few that play out one half-close. Clients are tests.support.Client (raw bytes over
asyncio streams) or small protocols for the bulk transfers, which keep only a count and a CRC-32.
Expected PROXY headers are built here from the specification, never with lbproxy's functions.

Waits are on conditions with deadlines. The only fixed pauses are the ones a behaviour is made of, and
each says so: a reader that stops for a second, traffic paced below an idle timeout, and the pieces of
a PROXY header arriving apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import random
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lbproxy import flow
from lbproxy.runtime import Runtime
from lbproxy.tcp_proxy import TcpListener
from tests.support import (
    LOCALHOST,
    Backend,
    Client,
    RssSampler,
    buffered_for_clients,
    eventually,
    held_back,
    port_of,
    running,
)

KiB = 1024
MiB = 1024 * KiB
CHUNK = 256 * KiB
BLOCK = random.Random(7).randbytes(CHUNK)  # bulk bodies are this block repeated
SLOW_RCVBUF = 64 * KiB  # a slow client's socket receive buffer: less per read than lbproxy reads
IPV6 = "::1"

SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # PROXY v2 (spec §2.2)


@functools.cache
def block_crc(size: int) -> int:
    crc = 0
    whole, rest = divmod(size, CHUNK)
    for _ in range(whole):
        crc = zlib.crc32(BLOCK, crc)
    return zlib.crc32(BLOCK[:rest], crc)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_config(*servers: str, bind: str = "127.0.0.1:0", listener: str = "", pool: str = "") -> str:
    """Listener `tcp` (mode tcp) in front of pool `farm` with servers s0, s1...; extra YAML lines."""
    lines = ["listeners:", "  - name: tcp", "    mode: tcp", f'    bind: "{bind}"', "    pool: farm"]
    lines += ["    " + line for line in listener.strip().splitlines()]
    lines += ["pools:", "  farm:"]
    lines += ["    " + line for line in pool.strip().splitlines()]
    lines.append("    servers:")
    for index, server in enumerate(servers):
        lines += [f"      - name: s{index}", f'        address: "{server}"']
    # tests.support.running() calls str.format on the text
    return "\n".join(lines).replace("{", "{{").replace("}", "}}") + "\n"


def tcp_listener(lb: Runtime) -> TcpListener:
    listener = lb.listeners["tcp"]
    assert isinstance(listener, TcpListener)
    return listener


# -- back-ends ------------------------------------------------------------------------------------


@dataclass
class Serving:
    """A back-end listening on `host`: its port, and the protocol of each connection it accepted."""

    host: str
    port: int
    accepted: list[asyncio.Protocol] = field(default_factory=list)

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)


@contextlib.asynccontextmanager
async def serving(factory: Callable[[], asyncio.Protocol], host: str = LOCALHOST) -> AsyncIterator[Serving]:
    accepted: list[asyncio.Protocol] = []

    def make() -> asyncio.Protocol:
        protocol = factory()
        accepted.append(protocol)
        return protocol

    server = await asyncio.get_running_loop().create_server(make, host, 0)
    try:
        yield Serving(host, server.sockets[0].getsockname()[1], accepted)
    finally:
        server.close()
        for protocol in accepted:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abort()
        await server.wait_closed()


@contextlib.contextmanager
def refusing_port(host: str = LOCALHOST) -> Iterator[int]:
    """A port bound but not listening, held for the test: every connection to it is refused."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]


class Recorder(asyncio.Protocol):
    """Keeps every byte; the client's EOF leaves the connection open (half-close)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class AnswerAfterEof(Recorder):
    """Answers only once the client has shut down its writing, then closes."""

    def eof_received(self) -> bool:
        self.eof = True
        assert self.transport is not None
        self.transport.write(b"answer written after EOF to %d bytes" % len(self.data))
        self.transport.close()
        return True


class GreetAndShut(Recorder):
    """Says hello and shuts down its own writing at once; keeps reading until the client's EOF."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(b"hello, then EOF")
        self.transport.write_eof()

    def eof_received(self) -> bool:
        self.eof = True
        return False  # both ways done: close


class Tripler(Recorder):
    """At the client's EOF, answers three bytes for every byte received, then closes."""

    def eof_received(self) -> bool:
        self.eof = True
        assert self.transport is not None
        self.transport.write(b"3" * (3 * len(self.data)))
        self.transport.close()
        return True


class Echo(asyncio.Protocol):
    """Writes back what it reads, keeping only a count and a CRC; stops reading while its writes back up."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.count = 0
        self.crc = 0
        self.ticking: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.count += len(data)
        self.crc = zlib.crc32(data, self.crc)
        self.transport.write(data)
        if data == b"tick\n" and self.ticking is None:
            self._tick()

    def _tick(self) -> None:
        """After `tick\\n`, one byte every 100 ms: traffic from the server side only."""
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(b".")
            self.ticking = asyncio.get_running_loop().call_later(0.1, self._tick)

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # the client is done: close once what is echoed is written

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ticking is not None:
            self.ticking.cancel()


class Firehose(asyncio.Protocol):
    """Writes `size` bytes of BLOCK as soon as connected, as fast as its transport takes them."""

    def __init__(self, size: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.remaining = size
        self.paused = False
        self.pauses = 0
        self.paused_event = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pump()

    def pause_writing(self) -> None:
        self.paused = True
        self.pauses += 1
        self.paused_event.set()

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def pump(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.remaining and not self.paused and not transport.is_closing():
            piece = BLOCK if self.remaining >= CHUNK else BLOCK[: self.remaining]
            transport.write(piece)
            self.remaining -= len(piece)


# -- clients --------------------------------------------------------------------------------------


class BulkClient(asyncio.Protocol):
    """Writes `size` bytes of BLOCK while reading what comes back; keeps a count and a CRC of that."""

    def __init__(self, size: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.size = size
        self.remaining = size
        self.paused = False
        self.count = 0
        self.crc = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pump()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def pump(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.remaining and not self.paused and not transport.is_closing():
            piece = BLOCK if self.remaining >= CHUNK else BLOCK[: self.remaining]
            transport.write(piece)
            self.remaining -= len(piece)

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self.count >= self.size and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed after {self.count} bytes back"))


class SlowReader(asyncio.Protocol):
    """Reads `size` bytes, keeping a count and a CRC; stops reading once `pause_at` bytes have come."""

    def __init__(self, size: int, pause_at: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.size = size
        self.pause_at = pause_at
        self.count = 0
        self.crc = 0
        loop = asyncio.get_running_loop()
        self.half_way: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self.count >= self.pause_at and not self.half_way.done():
            assert self.transport is not None
            self.transport.pause_reading()
            self.half_way.set_result(None)
        if self.count >= self.size and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.half_way, self.done):
            if not future.done():
                future.set_exception(ConnectionError(f"closed after {self.count} bytes"))


async def echoes(client: Client, data: bytes, timeout: float = 5.0) -> None:
    """`data` sent on `client` comes back whole."""
    await client.send(data)
    async with asyncio.timeout(timeout):
        assert await client.reader.readexactly(len(data)) == data


async def connections(serving: Serving, count: int) -> list[asyncio.Protocol]:
    await eventually(lambda: len(serving.accepted) >= count, what=f"{count} connections at the back-end")
    return serving.accepted


async def received(record: Recorder, size: int) -> bytes:
    await eventually(lambda: len(record.data) >= size, what=f"{size} bytes at the back-end")
    return bytes(record.data)


def proxy_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def proxy_v2(source: tuple[str, int], destination: tuple[str, int], command: int = 0x21) -> bytes:
    """Version 2 (high nibble), `command` PROXY (0x21) or LOCAL (0x20); TCP over IPv4 or IPv6."""
    six = ":" in source[0]
    af = socket.AF_INET6 if six else socket.AF_INET
    block = socket.inet_pton(af, source[0]) + socket.inet_pton(af, destination[0])
    block += source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    return SIGNATURE + bytes((command, 0x21 if six else 0x11)) + len(block).to_bytes(2, "big") + block


def read_proxy_header(data: bytes) -> tuple[int, tuple[str, int], tuple[str, int]]:
    """(its length, source, destination) of the PROXY header opening `data`; fails on anything else."""
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n")
        assert 0 < end <= 105, f"no PROXY v1 line in {data[:120]!r}"
        parts = data[:end].decode("ascii").split(" ")
        line = data[: end + 2]
        assert len(parts) == 6, f"not six fields in {line!r}"
        assert parts[1] in ("TCP4", "TCP6"), f"no address in {line!r}"
        source, destination = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
        version = 4 if parts[1] == "TCP4" else 6
        assert source.version == destination.version == version, line
        for port in parts[4:6]:
            assert port.isdigit(), line
            assert int(port) <= 65535, line
        return end + 2, (str(source), int(parts[4])), (str(destination), int(parts[5]))
    assert data[:12] == SIGNATURE, f"no PROXY header in {data[:40]!r}"
    assert data[12] == 0x21, f"not version 2 with command PROXY: {data[:16]!r}"
    family, length = data[13], int.from_bytes(data[14:16], "big")
    block = data[16 : 16 + length]
    assert len(block) == length
    if family == 0x11:
        assert length >= 12
        addresses = (socket.inet_ntop(socket.AF_INET, block[0:4]), socket.inet_ntop(socket.AF_INET, block[4:8]))
        ports = struct.unpack("!HH", block[8:12])
    else:
        assert family == 0x21, f"no TCP address in {data[: 16 + length]!r}"
        assert length >= 36
        addresses = (socket.inet_ntop(socket.AF_INET6, block[0:16]), socket.inet_ntop(socket.AF_INET6, block[16:32]))
        ports = struct.unpack("!HH", block[32:36])
    return 16 + length, (addresses[0], ports[0]), (addresses[1], ports[1])


def same_ip(a: str, b: str) -> bool:
    """The same IP address, an IPv4-mapped IPv6 address being its IPv4 address."""
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


def same_endpoint(a: tuple[str, int], b: tuple[str, int]) -> bool:
    return same_ip(a[0], b[0]) and a[1] == b[1]


# -- bytes both ways ------------------------------------------------------------------------------


async def test_256mib_both_ways_through_one_connection(tmp_path: Path) -> None:
    size = 256 * MiB
    expected = block_crc(size)
    loop = asyncio.get_running_loop()
    async with serving(Echo) as backend, running(tcp_config(backend.address), tmp_path) as lb:
        transport, client = await loop.create_connection(
            functools.partial(BulkClient, size), LOCALHOST, port_of(lb, "tcp")
        )
        try:
            async with asyncio.timeout(40.0):
                await client.done
        finally:
            transport.close()
        (echo,) = backend.accepted
        assert isinstance(echo, Echo)
        assert (echo.count, echo.crc) == (size, expected)
        assert (client.count, client.crc) == (size, expected)
        (server,) = lb.pools["farm"].servers
        await eventually(lambda: server.inflight == 0, what="the relay to end")
        assert (server.sent_bytes, server.received_bytes) == (size, size)


async def test_client_half_close_server_answers_after_eof(tmp_path: Path) -> None:
    async with serving(AnswerAfterEof) as backend, running(tcp_config(backend.address), tmp_path) as lb:
        async with await Client.connect(port_of(lb, "tcp")) as client:
            await client.send(b"a request of 28 bytes, then ")
            (record,) = await connections(backend, 1)
            assert isinstance(record, AnswerAfterEof)
            assert await received(record, 28) == b"a request of 28 bytes, then "
            assert not record.eof
            client.writer.write_eof()
            await eventually(lambda: record.eof, what="the client's EOF at the back-end")
            # the back-end's answer, written after that EOF, still reaches the client, then the close
            assert await client.closed(timeout=5.0) == b"answer written after EOF to 28 bytes"
        await eventually(lambda: record.lost, what="the back-end connection to close")
        await eventually(lambda: not tcp_listener(lb).connections, what="lbproxy to forget the connection")
        assert lb.pools["farm"].servers[0].inflight == 0


async def test_client_half_close_before_the_server_connection_is_open(tmp_path: Path) -> None:
    """Bytes and EOF sent at once, while lbproxy is still connecting: both reach the server, in order."""
    async with serving(AnswerAfterEof) as backend, running(tcp_config(backend.address), tmp_path) as lb:
        async with await Client.connect(port_of(lb, "tcp")) as client:
            client.writer.write(b"quick")
            client.writer.write_eof()
            assert await client.closed(timeout=5.0) == b"answer written after EOF to 5 bytes"
        (record,) = backend.accepted
        assert isinstance(record, AnswerAfterEof)
        assert (bytes(record.data), record.eof) == (b"quick", True)
        await eventually(lambda: not tcp_listener(lb).connections, what="lbproxy to forget the connection")


async def test_server_half_close_client_keeps_sending(tmp_path: Path) -> None:
    async with serving(GreetAndShut) as backend, running(tcp_config(backend.address), tmp_path) as lb:
        async with await Client.connect(port_of(lb, "tcp")) as client:
            # the server's EOF reaches the client after its bytes...
            async with asyncio.timeout(5.0):
                assert await client.reader.read() == b"hello, then EOF"
            # ...and the client's bytes still reach the server
            (record,) = await connections(backend, 1)
            assert isinstance(record, GreetAndShut)
            for index in range(3):
                await client.send(b"still talking %d\n" % index)
            assert await received(record, 48) == b"still talking 0\nstill talking 1\nstill talking 2\n"
            assert not record.eof
            assert not record.lost
            client.writer.write_eof()
            await eventually(lambda: record.eof and record.lost, what="the back-end to get EOF and close")
        await eventually(lambda: not tcp_listener(lb).connections, what="lbproxy to forget the connection")
        server = lb.pools["farm"].servers[0]
        assert server.inflight == 0
        assert (server.sent_bytes, server.received_bytes) == (48, 15)


async def test_slow_reader_holds_the_server_back_and_memory_flat(tmp_path: Path) -> None:
    size = 256 * MiB
    expected = block_crc(size)
    loop = asyncio.get_running_loop()
    async with (
        serving(functools.partial(Firehose, size)) as backend,
        running(tcp_config(backend.address), tmp_path) as lb,
        RssSampler() as memory,
    ):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)  # before connecting: caps the window
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (LOCALHOST, port_of(lb, "tcp")))
        except BaseException:
            sock.close()
            raise
        transport, client = await loop.create_connection(functools.partial(SlowReader, size, size // 2), sock=sock)
        try:
            async with asyncio.timeout(40.0):
                await client.half_way
                paused_at = loop.time()
                (firehose,) = await connections(backend, 1)
                assert isinstance(firehose, Firehose)
                # back-pressure reaches the server: its transport fills and tells it to stop
                await held_back(firehose)
                # The slow reader: it reads nothing for a second in all.
                await asyncio.sleep(max(0.0, paused_at + 1.0 - loop.time()))
                assert firehose.paused, "the server writes on while the client reads nothing"
                assert firehose.remaining > 0
                held = buffered_for_clients(tcp_listener(lb).connections)
                assert held <= 1 * MiB, f"lbproxy holds {held} bytes for the client"
                transport.resume_reading()
                await client.done
        finally:
            transport.close()
    assert (client.count, client.crc) == (size, expected)
    assert firehose.pauses >= 1
    assert memory.growth < 50 * MiB, f"RSS grew by {memory.growth / MiB:.1f} MiB"


# -- failover -------------------------------------------------------------------------------------


async def test_a_refused_server_is_skipped(tmp_path: Path) -> None:
    with refusing_port() as dead:
        async with (
            serving(Echo) as backend,
            running(
                tcp_config(f"{LOCALHOST}:{dead}", backend.address, pool="timeouts:\n  connect: 1s"), tmp_path
            ) as lb,
        ):
            for index in range(6):
                async with await Client.connect(port_of(lb, "tcp")) as client:
                    await echoes(client, b"connection %d\n" % index)
            refused, alive = lb.pools["farm"].servers
            listener = tcp_listener(lb)
            assert refused.connect_failures >= 1, "round robin never tried the refused server"
            assert listener.retries == refused.connect_failures == lb.pools["farm"].retried
            assert (alive.requests, alive.connect_failures) == (6, 0)
            assert listener.unavailable == 0
            assert listener.connections_total == 6
            await eventually(lambda: refused.inflight == alive.inflight == 0, what="every relay to end")


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A port whose connections hang: a listening socket whose accept queue is full drops new SYNs."""
    with socket.socket() as listening, socket.socket() as filler:
        listening.bind((LOCALHOST, 0))
        listening.listen(0)  # Linux queues backlog + 1 connections: `filler` takes that one place
        port = listening.getsockname()[1]
        filler.connect((LOCALHOST, port))
        yield port


async def test_a_server_that_does_not_answer_is_skipped_after_the_connect_timeout(tmp_path: Path) -> None:
    with unanswered_port() as silent:
        async with (
            serving(Echo) as backend,
            running(
                tcp_config(f"{LOCALHOST}:{silent}", backend.address, pool="timeouts:\n  connect: 200ms"), tmp_path
            ) as lb,
        ):
            hanging, alive = lb.pools["farm"].servers
            for index in range(2):
                started = time.monotonic()
                async with await Client.connect(port_of(lb, "tcp")) as client:
                    await echoes(client, b"connection %d\n" % index)
                assert time.monotonic() - started < 1.0, "the 200ms connect timeout was not applied"
            assert hanging.connect_failures >= 1, "round robin never tried the silent server"
            assert tcp_listener(lb).retries == hanging.connect_failures
            assert alive.requests == 2


async def test_a_refused_server_is_reported_to_passive_detection(tmp_path: Path) -> None:
    pool = "health:\n  type: tcp\n  interval: 1h\npassive:\n  consecutive_failures: 1"
    with refusing_port() as dead:
        async with (
            serving(Echo) as backend,
            running(tcp_config(f"{LOCALHOST}:{dead}", backend.address, pool=pool), tmp_path) as lb,
        ):
            refused, alive = lb.pools["farm"].servers
            for index in range(4):
                async with await Client.connect(port_of(lb, "tcp")) as client:
                    await echoes(client, b"connection %d\n" % index)
            assert refused.connect_failures >= 1
            assert not refused.up, "one refusal with consecutive_failures: 1 should take the server down"
            assert "passive" in refused.transition_reason
            assert alive.up
            assert alive.requests == 4


async def test_all_servers_refusing_closes_the_client_at_once(tmp_path: Path) -> None:
    with refusing_port() as first, refusing_port() as second:
        config = tcp_config(f"{LOCALHOST}:{first}", f"{LOCALHOST}:{second}")
        async with running(config, tmp_path) as lb:
            async with await Client.connect(port_of(lb, "tcp")) as client:
                with contextlib.suppress(ConnectionError):
                    await client.send(b"anyone there?\n")
                assert await client.closed(timeout=1.0) == b""
            listener = tcp_listener(lb)
            assert listener.unavailable == 1
            assert [server.connect_failures for server in lb.pools["farm"].servers] == [1, 1]
            assert listener.retries == 2
            assert [server.inflight for server in lb.pools["farm"].servers] == [0, 0]
            assert not listener.connections


async def test_no_server_available_closes_the_client_at_once(tmp_path: Path) -> None:
    async with serving(Recorder) as backend, running(tcp_config(backend.address), tmp_path) as lb:
        (server,) = lb.pools["farm"].servers
        lb.drain(server)
        async with await Client.connect(port_of(lb, "tcp")) as client:
            await client.send(b"anyone there?\n")
            assert await client.closed(timeout=1.0) == b""
        assert tcp_listener(lb).unavailable == 1
        assert backend.accepted == []
        assert (server.requests, server.inflight) == (0, 0)


async def test_least_connections_counts_open_connections(tmp_path: Path) -> None:
    async with (
        serving(Echo) as one,
        serving(Echo) as two,
        running(tcp_config(one.address, two.address, pool="policy: least_connections"), tmp_path) as lb,
    ):
        servers = lb.pools["farm"].servers
        clients: list[Client] = []
        try:
            for index in range(6):
                client = await Client.connect(port_of(lb, "tcp"))
                clients.append(client)
                await echoes(client, b"long-lived %d\n" % index)
            assert [server.inflight for server in servers] == [3, 3]
            assert (len(one.accepted), len(two.accepted)) == (3, 3)
        finally:
            for client in clients:
                await client.close()
        await eventually(lambda: [server.inflight for server in servers] == [0, 0], what="inflight back to 0")
        assert [server.requests for server in servers] == [3, 3]


# -- PROXY protocol sent to the servers ---------------------------------------------------------------


@pytest.mark.parametrize("host", [LOCALHOST, IPV6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_send_proxy_bytes_as_the_server_receives_them(tmp_path: Path, version: str, host: str) -> None:
    payload = b"the client's first bytes\r\n"
    async with (
        serving(Recorder, host) as backend,
        running(tcp_config(backend.address, bind=hostport(host, 0), pool=f"send_proxy: {version}"), tmp_path) as lb,
    ):
        port = port_of(lb, "tcp")
        async with await Client.connect(port, host) as client:
            source = client.writer.get_extra_info("sockname")[:2]
            await client.send(payload)
            (record,) = await connections(backend, 1)
            assert isinstance(record, Recorder)
            # the destination is where the client connected: lbproxy's listener
            build = proxy_v1 if version == "v1" else proxy_v2
            expected = build((source[0], source[1]), (host, port)) + payload
            assert await received(record, len(expected)) == expected


# -- PROXY protocol accepted from a balancer in front ---------------------------------------------------

ACCEPTED = [
    pytest.param(
        proxy_v1(("192.0.2.10", 40000), ("198.51.100.20", 443)),
        ("192.0.2.10", 40000),
        ("198.51.100.20", 443),
        id="v1-ipv4",
    ),
    pytest.param(
        proxy_v1(("2001:db8::a", 6000), ("2001:db8::b", 443)), ("2001:db8::a", 6000), ("2001:db8::b", 443), id="v1-ipv6"
    ),
    pytest.param(
        proxy_v2(("203.0.113.5", 1234), ("198.51.100.1", 443)),
        ("203.0.113.5", 1234),
        ("198.51.100.1", 443),
        id="v2-ipv4",
    ),
    pytest.param(
        proxy_v2(("2001:db8::5", 5555), ("2001:db8::1", 443)), ("2001:db8::5", 5555), ("2001:db8::1", 443), id="v2-ipv6"
    ),
    # what a dual-stack balancer in front sends for an IPv4 client
    pytest.param(
        proxy_v1(("::ffff:192.0.2.33", 7000), ("::ffff:10.0.0.1", 443)),
        ("192.0.2.33", 7000),
        ("10.0.0.1", 443),
        id="v1-ipv4-mapped",
    ),
]


@pytest.mark.parametrize(("header", "client", "destination"), ACCEPTED)
async def test_accept_proxy_strips_a_good_header(
    tmp_path: Path, header: bytes, client: tuple[str, int], destination: tuple[str, int]
) -> None:
    payload = b"what the client said\n"
    async with (
        serving(Recorder) as backend,
        running(tcp_config(backend.address, listener="accept_proxy: true"), tmp_path) as lb,
    ):
        async with await Client.connect(port_of(lb, "tcp")) as connection:
            await connection.send(header + payload)
            (record,) = await connections(backend, 1)
            assert isinstance(record, Recorder)
            assert await received(record, len(payload)) == payload
        assert tcp_listener(lb).bad_proxy_headers == 0


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(("header", "client", "destination"), ACCEPTED)
async def test_accept_proxy_then_send_proxy_carries_the_original_client(
    tmp_path: Path, version: str, header: bytes, client: tuple[str, int], destination: tuple[str, int]
) -> None:
    payload = b"what the client said\n"
    async with (
        serving(Recorder) as backend,
        running(
            tcp_config(backend.address, listener="accept_proxy: true", pool=f"send_proxy: {version}"), tmp_path
        ) as lb,
    ):
        port = port_of(lb, "tcp")
        async with await Client.connect(port) as connection:
            await connection.send(header + payload)
            (record,) = await connections(backend, 1)
            assert isinstance(record, Recorder)
            await eventually(lambda: record.data.endswith(payload), what="the payload after the header")
            data = bytes(record.data)
            if version == "v1":
                assert data.startswith(b"PROXY "), data
            else:
                assert data.startswith(SIGNATURE), data
            size, source, forwarded_destination = read_proxy_header(data)
            assert same_endpoint(source, client), (data[:size], client)
            # the destination: the original one from the accepted header, or lbproxy's own listener
            assert same_endpoint(forwarded_destination, destination) or same_endpoint(
                forwarded_destination, (LOCALHOST, port)
            ), data[:size]
            assert data[size:] == payload


BAD_HEADERS = [
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)), id="garbage"),
    pytest.param(b"PROXY TCP4 " + b"1" * 120, id="v1-line-over-107-bytes"),
    pytest.param(SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12) + b"payload", id="v2-wrong-version"),
    pytest.param(b"hello server, here is my data without any header\n", id="no-header"),
    pytest.param(b"PROXY TCP4 192.0.2.300 192.0.2.1 1 2\r\npayload", id="v1-bad-address"),
]


@pytest.mark.parametrize("data", BAD_HEADERS)
async def test_accept_proxy_closes_on_a_bad_header(tmp_path: Path, data: bytes) -> None:
    async with (
        serving(Recorder) as backend,
        running(tcp_config(backend.address, listener="accept_proxy: true"), tmp_path) as lb,
    ):
        async with await Client.connect(port_of(lb, "tcp")) as client:
            await client.send(data)
            assert await client.closed(timeout=1.0) == b""
        listener = tcp_listener(lb)
        assert listener.bad_proxy_headers == 1
        assert not listener.connections
        assert backend.accepted == [], "a connection without a good header reached the back-end"
        assert lb.pools["farm"].servers[0].requests == 0


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(proxy_v1(("192.0.2.10", 40000), ("198.51.100.20", 443)), id="v1"),
        pytest.param(proxy_v2(("203.0.113.5", 5555), ("198.51.100.1", 443)), id="v2"),
    ],
)
async def test_accept_proxy_header_split_across_writes(tmp_path: Path, header: bytes) -> None:
    payload = b"after the header\n"
    data = header + payload
    cuts = [0, 1, 5, 13, 15, 20, len(header) - 1, len(header) + 3, len(data)]
    async with (
        serving(Recorder) as backend,
        running(tcp_config(backend.address, listener="accept_proxy: true", pool="send_proxy: v1"), tmp_path) as lb,
    ):
        async with await Client.connect(port_of(lb, "tcp")) as client:
            for start, end in itertools.pairwise(cuts):
                await client.send(data[start:end])
                # A pause so that each piece arrives in its own read, which is what is tested here.
                await asyncio.sleep(0.02)
            (record,) = await connections(backend, 1)
            assert isinstance(record, Recorder)
            await eventually(lambda: record.data.endswith(payload), what="the payload")
            size, source, _ = read_proxy_header(bytes(record.data))
            assert source == (("192.0.2.10", 40000) if header.startswith(b"PROXY") else ("203.0.113.5", 5555))
            assert bytes(record.data[size:]) == payload
        assert tcp_listener(lb).bad_proxy_headers == 0


@pytest.mark.parametrize(
    ("header", "client"),
    [
        pytest.param(proxy_v1(("203.0.113.9", 5555), ("198.51.100.1", 80)), b"203.0.113.9", id="v1-ipv4"),
        pytest.param(proxy_v2(("2001:db8::9", 5555), ("2001:db8::1", 80)), b"2001:db8::9", id="v2-ipv6"),
        pytest.param(proxy_v2(("203.0.113.9", 5555), ("198.51.100.1", 80)), b"203.0.113.9", id="v2-ipv4"),
    ],
)
async def test_accept_proxy_on_http_sets_x_forwarded_for(tmp_path: Path, header: bytes, client: bytes) -> None:
    config = """
        listeners:
          - name: web
            bind: 127.0.0.1:0
            pool: farm
            accept_proxy: true
        pools:
          farm:
            servers:
              - name: a
                address: "{address}"
    """
    async with Backend() as backend, running(config, tmp_path, address=backend.address) as lb:
        async with await Client.connect(port_of(lb)) as connection:
            await connection.send(header + b"GET /who HTTP/1.1\r\nHost: app\r\n\r\n")
            response = await connection.response()
        assert response.status == 200
        (request,) = backend.requests
        assert request.header_lines(b"x-forwarded-for") == [client]
        assert lb.listeners["web"].bad_proxy_headers == 0


# -- limits ---------------------------------------------------------------------------------------


async def test_closed_connections_stay_counted_until_gone_and_are_aborted_at_the_linger_deadline(
    tmp_path: Path,
) -> None:
    """Idle-closed with bytes their clients never read: open, so counted, until aborted (issue #14, defect 4)."""
    listener_yaml = "idle_timeout: 500ms\nmax_connections: 3"
    async with (
        serving(functools.partial(Firehose, 8 * 1024 * 1024)) as backend,
        running(tcp_config(backend.address, listener=listener_yaml), tmp_path) as lb,
    ):
        port = port_of(lb, "tcp")
        listener = tcp_listener(lb)
        clients = []
        for _ in range(3):
            client = await Client.connect(port)
            client.writer.transport.pause_reading()  # type: ignore[attr-defined]
            clients.append(client)
        try:
            await eventually(
                lambda: len(listener.connections) == 3 and all(c.closed for c in listener.connections),
                5.0,
                "idle closes",
            )
            assert len(listener.connections) == 3  # closed by lbproxy, still open: still counted
            extra = await Client.connect(port)
            await eventually(lambda: listener.rejected == 1, 2.0, "a fourth connection refused")
            await extra.close()
            await eventually(lambda: not listener.connections, flow.CLOSE_LINGER + 2.0, "the linger deadline")
        finally:
            for client in clients:
                client.writer.transport.abort()  # type: ignore[attr-defined]


async def test_idle_timeout_closes_a_silent_connection_and_spares_active_ones(tmp_path: Path) -> None:
    async with (
        serving(Echo) as backend,
        running(tcp_config(backend.address, listener="idle_timeout: 500ms"), tmp_path) as lb,
    ):
        port = port_of(lb, "tcp")
        started = time.monotonic()
        silent = await Client.connect(port)
        talker = await Client.connect(port)
        listener_only = await Client.connect(port)
        try:
            await listener_only.send(b"tick\n")  # from here on only the server sends (a byte per 100 ms)

            async def silent_close() -> float:
                await silent.closed(timeout=3.0)
                return time.monotonic() - started

            closing = asyncio.ensure_future(silent_close())
            # The active connections: traffic paced well inside the timeout, for three timeouts.
            while time.monotonic() < started + 1.5:
                await echoes(talker, b".")
                await asyncio.sleep(0.1)
            elapsed = await closing
            assert 0.49 <= elapsed <= 1.25, f"the silent connection closed after {elapsed:.2f}s"
            # both active connections are still open and relaying
            await echoes(talker, b"still here\n")
            async with asyncio.timeout(5.0):
                got = await listener_only.reader.read(65536)
            assert got.startswith(b"tick\n"), got
            assert got[5:] == b"." * len(got[5:]), got
            async with asyncio.timeout(5.0):
                assert await listener_only.reader.readexactly(1) == b"."
            assert len(tcp_listener(lb).connections) == 2
        finally:
            for client in (silent, talker, listener_only):
                await client.close()


async def test_max_connections_closes_the_one_over_at_once(tmp_path: Path) -> None:
    async with (
        serving(Echo) as backend,
        running(tcp_config(backend.address, listener="max_connections: 2"), tmp_path) as lb,
    ):
        port = port_of(lb, "tcp")
        listener = tcp_listener(lb)
        first = await Client.connect(port)
        second = await Client.connect(port)
        try:
            await echoes(first, b"one\n")
            await echoes(second, b"two\n")
            async with await Client.connect(port) as third:
                with contextlib.suppress(ConnectionError):
                    await third.send(b"three\n")
                assert await third.closed(timeout=1.0) == b""
            assert listener.rejected == 1
            assert len(backend.accepted) == 2
            await echoes(first, b"one again\n")
            await echoes(second, b"two again\n")
            await first.close()
            await eventually(lambda: len(listener.connections) == 1, what="the first connection to end")
            async with await Client.connect(port) as fourth:
                await echoes(fourth, b"four\n")
            assert listener.rejected == 1
        finally:
            await first.close()
            await second.close()


# -- counters -------------------------------------------------------------------------------------


async def test_bytes_and_connections_counted_per_server(tmp_path: Path) -> None:
    sizes = [1000, 2000, 3000, 4000, 5000]
    async with (
        serving(Tripler) as one,
        serving(Tripler) as two,
        running(tcp_config(one.address, two.address), tmp_path) as lb,
    ):
        for size in sizes:
            async with await Client.connect(port_of(lb, "tcp")) as client:
                await client.send(b"x" * size)
                client.writer.write_eof()
                assert await client.closed(timeout=5.0) == b"3" * (3 * size)
        servers = lb.pools["farm"].servers
        await eventually(lambda: all(server.inflight == 0 for server in servers), what="every relay to end")
        for server, backend in zip(servers, (one, two), strict=True):
            got = sum(len(record.data) for record in backend.accepted if isinstance(record, Tripler))
            assert server.requests == len(backend.accepted)
            assert server.sent_bytes == got
            assert server.received_bytes == 3 * got
        assert sum(server.sent_bytes for server in servers) == sum(sizes)
        assert sum(server.requests for server in servers) == len(sizes)
        assert tcp_listener(lb).connections_total == len(sizes)
