"""The floor of the macro benchmarks: a plain reverse proxy on aiohttp's server and ClientSession, on uvloop.

    python benchmarks/aiohttp_proxy.py PORT BACKEND_PORT [BACKEND_PORT ...]

Listens on 127.0.0.1:PORT and sends each request to the next back-end in turn over a keep-alive
ClientSession, streaming the response back; hop-by-hop headers are dropped both ways and
X-Forwarded-For is added, as the other proxies in the comparison do. What someone writes in an
afternoon with aiohttp, as the baseline lbproxy's hand-written protocols must beat.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host")
)


async def serve(port: int, backends: list[int]) -> None:
    session = ClientSession(
        connector=TCPConnector(limit=0), auto_decompress=False, timeout=ClientTimeout(total=None, sock_read=60)
    )
    rotation = itertools.cycle(f"http://127.0.0.1:{backend}" for backend in backends)

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
        headers["X-Forwarded-For"] = request.remote or ""
        body = request.content if request.body_exists else None
        url = next(rotation) + request.path_qs
        async with session.request(request.method, url, headers=headers, data=body, allow_redirects=False) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(256 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await runner.cleanup()
    await session.close()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(int(sys.argv[1]), [int(port) for port in sys.argv[2:]]))
