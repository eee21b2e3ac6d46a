"""A tiny HTTP/1.1 back-end for tests that need a server in another process (to SIGKILL it).

Usage: python http_server.py NAME FD

FD is a listening socket the parent bound and passed down (so the port is known before this process
starts, and the same port can be handed to a restarted one). Every request gets `200` with NAME as
its body, keep-alive; `/health` gets `200 ok`. It runs until it is killed.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import httptools


class Connection(asyncio.Protocol):
    def __init__(self, name: bytes) -> None:
        self.name = name
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        body = b"ok" if self.url == b"/health" else self.name
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        if not self.parser.should_keep_alive():
            self.transport.close()


async def main(name: bytes, fd: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    server = await loop.create_server(lambda: Connection(name), sock=sock)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].encode(), int(sys.argv[2])))
