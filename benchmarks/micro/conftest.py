"""What the micro-benchmarks share: a stub transport, pools of N servers, and typical HTTP heads.

These are pytest-benchmark files (`bench_*.py`), run by `make bench` with
`pytest benchmarks/micro -o python_files='bench_*.py'`; `make test` never collects them (its
testpaths is `tests/`), and nothing here is a timed assertion.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop

from lbproxy.config import Address, PoolConfig, ServerConfig
from lbproxy.pool import Pool

# What Chrome sends for a script on a page it already has cookies for: 15 fields, ~800 bytes.
BROWSER_REQUEST = (
    b"GET /static/js/app.3f2a1c.js?v=124 HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"Connection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"\r\n'
    b"sec-ch-ua-mobile: ?0\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/124.0.0.0 Safari/537.36\r\n"
    b'sec-ch-ua-platform: "Linux"\r\n'
    b"Accept: */*\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Sec-Fetch-Mode: no-cors\r\n"
    b"Sec-Fetch-Dest: script\r\n"
    b"Referer: https://www.example.com/account/orders?page=2\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-GB,en-US;q=0.9,en;q=0.8\r\n"
    b"Cookie: session=9f8e7d6c5b4a39281706f5e4d3c2b1a0; _ga=GA1.2.1234567890.1700000000; consent=yes\r\n"
    b"\r\n"
)

# What a server answers to it: 10 fields, among them the hop-by-hop `Connection: keep-alive` that
# every proxy must cut. No blank line: `framing.ResponseHead` takes the head up to the last field.
RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Tue, 24 Nov 2026 02:00:00 GMT\r\n"
    b"Content-Type: application/javascript; charset=utf-8\r\n"
    b"Content-Length: 12\r\n"
    b"Last-Modified: Mon, 23 Nov 2026 18:00:00 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6560f1b0-c"\r\n'
    b"Cache-Control: public, max-age=31536000, immutable\r\n"
    b"Vary: Accept-Encoding\r\n"
    b"Accept-Ranges: bytes\r\n"
)
RESPONSE = RESPONSE_HEAD + b"\r\nhello world\n"


class StubTransport:
    """Just enough of an asyncio transport for a protocol to run without a socket; counts what it is given."""

    __slots__ = ("written", "last", "closing")

    def __init__(self) -> None:
        self.written = 0
        self.last = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.last = data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.written += len(part)
        self.last = parts[-1] if parts else b""

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("192.0.2.10", 51000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def make_pool(policy: str, count: int, name: str = "farm", persistence: object = None) -> Pool:
    """A pool of `count` servers; ratios 1 to 4 in turn, so that weighted policies have weights to weigh.

    `persistence`: a `config.PersistenceConfig`, or None for none (the only choice with a checkout
    older than issue #15, whose PoolConfig has no such field: instructions.py --base counts those).
    """
    servers = tuple(
        ServerConfig(name=f"s{index}", address=Address("127.0.0.1", 10000 + index), ratio=index % 4 + 1)
        for index in range(count)
    )
    extra = {} if persistence is None else {"persistence": persistence}
    return Pool(PoolConfig(name=name, servers=servers, policy=policy, **extra))  # type: ignore[arg-type]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A uvloop loop that never runs: the protocols only read its clock."""
    event_loop = uvloop.new_event_loop()
    yield event_loop
    event_loop.close()
