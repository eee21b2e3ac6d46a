"""Real parts for the tests: lbproxy on 127.0.0.1 from a YAML text, recording back-ends, raw clients.

Everything listens on port 0 of 127.0.0.1 and is torn down by the test that started it. Waiting is
done on conditions with deadlines (`eventually`), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httptools
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from lbproxy import config
from lbproxy.runtime import Runtime

LOCALHOST = "127.0.0.1"
KiB = 1024


@contextlib.asynccontextmanager
async def running(yaml_text: str, directory: Path, **substitutions: object) -> AsyncIterator[Runtime]:
    """lbproxy started on the config `yaml_text` (dedented, `{name}` filled from `substitutions`)."""
    path = directory / "lbproxy.yaml"
    path.write_text(textwrap.dedent(yaml_text).format(**substitutions))
    runtime = Runtime(config.load(path, environ={}))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def admin_farm(admin: str = "", pool: str = "") -> str:
    """A config text for `running()`: the admin server and listener `web` on 127.0.0.1:0, and pool
    `farm` with servers a and b at `{a}` and `{b}`. `admin` and `pool` are more lines for those
    blocks, indented as they are to stand (2 and 4 spaces); they may hold `running()` fields too."""
    return (
        "\nadmin:\n  bind: 127.0.0.1:0\n"
        + admin
        + "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    pool: farm\npools:\n  farm:\n"
        + pool
        + '    servers:\n      - {{name: a, address: "{a}"}}\n      - {{name: b, address: "{b}"}}\n'
    )


def port_of(runtime: Runtime, listener: str = "web") -> int:
    return runtime.bound[listener].port


def free_port() -> int:
    """A port nothing listens on now, for a process that binds it itself."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on now: held together while chosen, so none comes twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOCALHOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait until `check()` is true, polling, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- back-ends ------------------------------------------------------------------------------------


@dataclass
class Request:
    """One request as a recording back-end received it."""

    raw: bytes  # the exact bytes of the head and body
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    connection: int  # which accepted connection (0-based) it came on

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_lines(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


Responder = Callable[["Request", asyncio.Transport], Awaitable[None] | None]


def ok(body: bytes = b"ok") -> Responder:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return respond


def answers_when(release: asyncio.Event, body: bytes = b"slow") -> Responder:
    """A responder that holds every request until `release` is set, then answers 200 with `body`."""

    async def respond(request: Request, transport: asyncio.Transport) -> None:
        await release.wait()
        if not transport.is_closing():
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return respond


@dataclass
class Backend:
    """A raw asyncio HTTP/1.1 server that records every byte and request it receives.

    `respond(request, transport)` writes the answer (default: 200 with the back-end's name); it may
    be a coroutine function. `raw` keeps every connection's bytes, `requests` the parsed requests.
    """

    name: str = "backend"
    respond: Responder | None = None
    port: int = 0
    raw: list[bytearray] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    accepted: int = 0
    transports: list[asyncio.Transport] = field(default_factory=list)
    tasks: set[asyncio.Future[None]] = field(default_factory=set)
    tls: ssl.SSLContext | None = None  # a server context: the back-end speaks HTTPS
    _server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> Backend:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _BackendProtocol(self), LOCALHOST, port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self.tasks):
                task.cancel()
            for transport in self.transports:
                transport.abort()
            await self._server.wait_closed()
            self._server = None

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    async def __aenter__(self) -> Backend:
        return await self.start(self.port)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _BackendProtocol(asyncio.Protocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.parser = httptools.HttpRequestParser(self)
        self.index = 0
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.index = self.backend.accepted
        self.backend.accepted += 1
        self.backend.raw.append(bytearray())
        self.backend.transports.append(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.backend.raw[self.index] += data
        self.buffer += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        request = Request(
            raw=bytes(self.buffer),  # lbproxy sends one request at a time, so this is exactly one
            method=self.parser.get_method(),
            target=self.url,
            headers=self.headers,
            body=bytes(self.body),
            connection=self.index,
        )
        self.buffer.clear()
        self.backend.requests.append(request)
        respond = self.backend.respond or ok(self.backend.name.encode())
        assert self.transport is not None
        result = respond(request, self.transport)
        if result is not None:
            task = asyncio.ensure_future(result)
            self.backend.tasks.add(task)
            task.add_done_callback(self.backend.tasks.discard)


# -- clients --------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class _ResponseReader:
    def __init__(self, head_only: bool = False) -> None:
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)
        self.responses: list[Response] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.responses.append(Response(self.parser.get_status_code(), self.headers, bytes(self.body)))
        self.headers = []
        self.body = bytearray()


def parse_responses(data: bytes) -> list[Response]:
    """The complete responses in `data`; fails the test (a parser error) if anything else follows them."""
    reader = _ResponseReader()
    if data:
        reader.parser.feed_data(data)
    return reader.responses


class Client:
    """A raw HTTP/1.1 client on one TCP connection: send exact bytes, read parsed responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._parsed = _ResponseReader()
        self.received = bytearray()

    @classmethod
    async def connect(cls, port: int, host: str = LOCALHOST) -> Client:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def responses(self, count: int = 1, timeout: float = 5.0) -> list[Response]:
        """Read until `count` complete responses have arrived (the oldest first) and return them."""
        async with asyncio.timeout(timeout):
            while len(self._parsed.responses) < count:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError(f"closed after {len(self._parsed.responses)} responses")
                self.received += data
                self._parsed.parser.feed_data(data)
        taken = self._parsed.responses[:count]
        del self._parsed.responses[:count]
        return taken

    async def response(self, timeout: float = 5.0) -> Response:
        return (await self.responses(1, timeout))[0]

    async def closed(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes the connection; returns what came before the close."""
        rest = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                rest += data
        self.received += rest
        return bytes(rest)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def ctl(*args: str) -> tuple[int, str, str]:
    """`lbproxy ctl ARGS` as a subprocess: exit code, standard output, standard error."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lbproxy",
        "ctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LBPROXY_ADMIN_TOKEN": ""},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def get(port: int, target: bytes = b"/", host: bytes = b"test", headers: bytes = b"") -> Response:
    """One GET on a new connection (`headers`: more header lines, each ending in CRLF)."""
    async with await Client.connect(port) as client:
        await client.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, host, headers))
        return await client.response()


# -- memory -------------------------------------------------------------------------------------


def rss() -> int:
    """This process's resident set size in bytes (VmRSS in /proc/self/status)."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS in /proc/self/status")


class RssSampler:
    """This process's RSS (lbproxy's: tests run it in-process), sampled every 100 ms while the block runs.

    `growth` is the largest rise over the start.
    """

    def __init__(self) -> None:
        self.start = rss()
        self.peak = self.start
        self._task: asyncio.Task[None] | None = None

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def sample(self) -> int:
        now = rss()
        self.peak = max(self.peak, now)
        return now

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sample()


class Pausable(Protocol):
    """A test server that records whether its transport asked it to stop writing."""

    paused: bool
    paused_event: asyncio.Event


async def held_back(server: Pausable, timeout: float = 5.0) -> None:
    """Wait until back-pressure reaches `server` (its transport paused it); fail after `timeout`."""
    server.paused_event.clear()
    try:
        async with asyncio.timeout(timeout):
            while not server.paused:
                await server.paused_event.wait()
                server.paused_event.clear()
    except TimeoutError:
        raise AssertionError("the client stopped reading, but the server was never held back") from None


def buffered_for_clients(connections: Iterable[Any]) -> int:
    """Bytes a listener's client connections hold in their transports' write buffers."""
    return sum(c.transport.get_write_buffer_size() for c in connections if c.transport is not None)


# -- certificates --------------------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class Issued:
    cert: Path
    key: Path


class Authority:
    """A test CA that issues server certificates into a folder."""

    def __init__(self, folder: Path, stem: str = "ca") -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"lbproxy test CA {stem}")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{stem}.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, stem: str, *names: str, days: float = 30, key_of: Issued | None = None, common_name: bool = True
    ) -> Issued:
        """A certificate for `names` (the first one its CommonName too, unless not `common_name`)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, names[0])] if common_name else []
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=2))
            .not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_alternative(name) for name in names]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        issued = Issued(self.folder / f"{stem}.pem", self.folder / f"{stem}.key")
        issued.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        if key_of is not None:
            issued.key.write_bytes(key_of.key.read_bytes())  # another certificate's key
        else:
            issued.key.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        return issued

    def server_context(self, issued: Issued, clients: Authority | None = None) -> ssl.SSLContext:
        """A back-end's context serving `issued`; with `clients`, a client certificate from it is required."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(issued.cert, issued.key)
        if clients is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(clients.path)
        return context


def _alternative(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


# -- a real browser ------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@contextlib.contextmanager
def chromium(directory: Path, *arguments: str) -> Iterator[WebDriver]:
    """Debian's headless Chromium under Selenium (skips the test when it is not installed)."""
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not binary.exists():
            pytest.skip(f"{binary} is missing: install Debian's {package} (.ci/system-deps does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={directory / 'chromium'}",
        *arguments,
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see script and policy errors
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
