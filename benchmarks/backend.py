"""A back-end for benchmarks/failover.py: one small HTTP/1.1 server in its own process, to kill or freeze.

    python benchmarks/backend.py NAME PORT

Listens on 127.0.0.1:PORT only (with SO_REUSEADDR, so that a restarted one takes the port of a killed
one at once). `/health` gets `200 ok`; every other request gets `200` with NAME as its body and in an
`X-Served-By` header, kept alive when the client asks. Once it listens it prints `ready SECONDS`,
SECONDS being its `time.monotonic()`: CLOCK_MONOTONIC is one clock for every process of the machine,
so the benchmark can time from the instant the port is open rather than from the fork. It runs until
it is stopped by a signal (SIGTERM, or SIGKILL in the benchmark).
"""

from __future__ import annotations

import asyncio
import sys
import time

import httptools

BACKLOG = 511  # nginx's default: a frozen server's kernel accepts this many before dropping SYNs


class Requests(asyncio.Protocol):
    """A client connection read with llhttp: `on_message_complete` answers each request (its `url`)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url


class Connection(Requests):
    """One client connection; requests on it are answered in order."""

    def __init__(self, replies: dict[tuple[bool, bool], bytes]) -> None:
        super().__init__()
        self.replies = replies  # by (health check, keep-alive)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        keep = self.parser.should_keep_alive()
        transport.write(self.replies[self.url.startswith(b"/health"), keep])
        if not keep:
            transport.close()


def replies(name: str) -> dict[tuple[bool, bool], bytes]:
    """Every response this back-end sends, by (health check, keep-alive), built once."""
    table = {}
    for health in (False, True):
        body = b"ok\n" if health else name.encode() + b"\n"
        for keep in (False, True):
            table[health, keep] = b"".join(
                (
                    b"HTTP/1.1 200 OK\r\n",
                    b"X-Served-By: %s\r\n" % name.encode(),
                    b"Content-Type: text/plain\r\n",
                    b"Content-Length: %d\r\n" % len(body),
                    b"" if keep else b"Connection: close\r\n",
                    b"\r\n",
                    body,
                )
            )
    return table


async def serve(name: str, port: int) -> None:
    table = replies(name)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(table), "127.0.0.1", port, reuse_address=True, backlog=BACKLOG)
    print(f"ready {time.monotonic():.6f}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # plain asyncio does the job too, a little slower
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(sys.argv[1], int(sys.argv[2])))
    except OSError as error:
        print(f"backend {sys.argv[1]}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
