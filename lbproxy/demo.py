"""The demo farm behind `make run`: small aiohttp back-ends that say who they are.

Each back-end answers every request with its own name and the Host header and request-target it
received, so that `curl localhost:8080/` shows the rotation and what reached the server. Used by
`lbproxy demo` and handy in tests; never part of the proxy itself.
"""

from __future__ import annotations

from aiohttp import web

from lbproxy.config import Address


def backend_app(name: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        host = request.headers.get("Host", "")
        body = f"server: {name}\nhost: {host}\ntarget: {request.raw_path}\n"
        return web.Response(text=body, headers={"X-Served-By": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def start_backend(name: str, address: Address) -> web.AppRunner:
    """Serve the demo back-end `name` on `address`; the caller awaits `runner.cleanup()` to stop it."""
    runner = web.AppRunner(backend_app(name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    await site.start()
    return runner
