"""The admin server: liveness, readiness and the JSON API that operators and `lbproxy ctl` use.

An aiohttp application beside the proxy, on `admin.bind`. It reads the runtime objects (pools,
servers, their counters) and commands them through the runtime's methods (`drain`, `disable`,
`enable`); it never reaches into a protocol. Write calls need `Authorization: Bearer <admin.token>`
when a token is set; with no token they are allowed only when the admin server listens on a loopback
address. Every error is JSON: `{"error": "..."}` with 400, 401, 403 or 404.
"""

from __future__ import annotations

import functools
import hmac
import importlib.resources
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from lbproxy.pool import WEIGHT_SCALE, Pool, Server


class Runtime(Protocol):
    """What the admin side needs of the runtime (which imports this module, not the reverse)."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def ready(self) -> bool: ...

    def listener_states(self) -> list[dict[str, Any]]: ...

    def server(self, pool: str, server: str) -> Server: ...

    def drain(self, server: Server) -> None: ...

    def disable(self, server: Server) -> None: ...

    def enable(self, server: Server) -> None: ...

    async def reload(self) -> list[str]: ...

    async def refresh(self) -> None: ...


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry")
ACTIONS = ("drain", "disable", "enable")


def make_app(runtime: Runtime, registry: CollectorRegistry, token: str | None, loopback: bool) -> web.Application:
    """The admin application; `loopback` says whether it listens on a loopback address only."""
    app = web.Application(middlewares=[_json_errors])
    app[RUNTIME] = runtime
    app[REGISTRY] = registry
    app.router.add_get("/", status_page)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/api/v1/listeners", listeners)
    app.router.add_get("/api/v1/pools", pools)
    app.router.add_get("/api/v1/pools/{pool}", pool)
    app.router.add_post("/api/v1/pools/{pool}/servers/{server}/{action}", _guarded(action, token, loopback))
    app.router.add_post("/api/v1/reload", _guarded(reload, token, loopback))
    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return web.json_response({"error": error.reason if error.text is None else error.text}, status=error.status)


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=message, content_type="text/plain")


def _guarded(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], token: str | None, loopback: bool
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def checked(request: web.Request) -> web.StreamResponse:
        if token is None:
            if not loopback:
                raise _error(web.HTTPForbidden, "writes are refused: set admin.token to allow them off loopback")
        else:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                raise _error(web.HTTPUnauthorized, "missing or wrong bearer token")
        return await handler(request)

    return checked


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition, or OpenMetrics when the scraper asks for it."""
    await request.app[RUNTIME].refresh()
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[REGISTRY])
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


# The status page may fetch the API of its own origin and nothing else: it is one self-contained file
# (farms are often offline), and the policy makes the browser refuse anything it would load from away.
STATUS_PAGE_POLICY = (
    "default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@functools.cache
def _status_page_html() -> bytes:
    """status.html, shipped in the package; read once, on the first request for it."""
    return (importlib.resources.files("lbproxy") / "status.html").read_bytes()


async def status_page(request: web.Request) -> web.Response:
    """The status page: listeners, pools and servers, refreshed in the browser from the JSON API."""
    response = web.Response(body=_status_page_html(), content_type="text/html", charset="utf-8")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = STATUS_PAGE_POLICY
    return response


def _operation(summary: str, *errors: int, body: str = "object") -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": {"type": body}}}}
    }
    for status in errors:
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    return {"summary": summary, "responses": responses}


_NAME = {"in": "path", "required": True, "schema": {"type": "string"}}
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "lbproxy admin API", "version": "1"},
    "paths": {
        "/healthz": {"get": _operation("lbproxy itself is alive")},
        "/readyz": {"get": _operation("listeners bound and every server probed once (503 otherwise)", 503)},
        "/api/v1/listeners": {"get": _operation("every listener and its counters")},
        "/api/v1/pools": {"get": _operation("every pool, its policy and servers, with state and counters")},
        "/api/v1/pools/{pool}": {
            "parameters": [{"name": "pool", **_NAME}],
            "get": _operation("one pool", 404),
        },
        "/api/v1/pools/{pool}/servers/{server}/{action}": {
            "parameters": [
                {"name": "pool", **_NAME},
                {"name": "server", **_NAME},
                {"name": "action", "in": "path", "required": True, "schema": {"type": "string", "enum": list(ACTIONS)}},
            ],
            "post": {
                **_operation("drain, disable or enable a server; answers its new state", 400, 401, 403, 404),
                "security": [{"bearer": []}],
            },
        },
        "/api/v1/reload": {
            "post": {
                **_operation("re-read the config file; 400 with the problems when it is refused", 400, 401, 403),
                "security": [{"bearer": []}],
            }
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {
            f"E{status}": {
                "description": text,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
                    }
                },
            }
            for status, text in (
                (400, "bad request"),
                (401, "missing or wrong bearer token"),
                (403, "writes refused: no token on a non-loopback bind"),
                (404, "unknown pool or server"),
                (503, "not ready"),
            )
        },
    },
}


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "starting"}, status=503)


async def listeners(request: web.Request) -> web.Response:
    await request.app[RUNTIME].refresh()
    return web.json_response({"listeners": request.app[RUNTIME].listener_states()})


async def pools(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    await runtime.refresh()
    return web.json_response({"pools": [pool_state(p) for p in runtime.pools.values()]})


async def pool(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    await runtime.refresh()
    found = runtime.pools.get(request.match_info["pool"])
    if found is None:
        raise _error(web.HTTPNotFound, f"no pool named {request.match_info['pool']!r}")
    return web.json_response(pool_state(found))


async def action(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = request.match_info["action"]
    if name not in ACTIONS:
        raise _error(web.HTTPBadRequest, f"unknown action {name!r}: use one of {', '.join(ACTIONS)}")
    try:
        server = runtime.server(request.match_info["pool"], request.match_info["server"])
    except KeyError as error:
        raise _error(web.HTTPNotFound, str(error.args[0])) from None
    getattr(runtime, name)(server)
    await runtime.refresh()  # with workers: their in-flight counts
    return web.json_response(server_state(server))


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file: 200 when applied, 400 with the problems when refused (nothing changed)."""
    problems = await request.app[RUNTIME].reload()
    if problems:
        return web.json_response(
            {"error": "the config was refused; the running one stays", "problems": problems}, status=400
        )
    return web.json_response({"result": "reloaded"})


def pool_state(pool: Pool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "policy": pool.policy_name,
        "retries": pool.retries,
        "min_up": pool.min_up,
        "backup_pool": pool.backup_pool.name if pool.backup_pool is not None else None,
        "tier": pool.tier.value,
        "servers_up": sum(1 for server in pool.servers if server.up),
        "servers_available": sum(1 for server in pool.servers if server.available),
        "counters": {"failovers": pool.failovers, "retries": pool.retried, "depool_refusals": pool.depool_refusals},
        "servers": [server_state(server) for server in pool.servers],
    }


def server_state(server: Server) -> dict[str, Any]:
    return {
        "name": server.name,
        "address": str(server.address),
        "ratio": server.ratio,
        "weight": server.weight / WEIGHT_SCALE,  # live, in ratio units
        "backup": server.backup,
        "state": "up" if server.up else "down",
        "admin": server.admin.value,
        "available": server.available,
        "inflight": server.inflight,
        "since": server.transition_time or None,  # the last health transition
        "admin_since": server.admin_time or None,
        "reason": server.transition_reason,
        "last_change": last_change(server),
        "last_check": {
            "ok": server.check_ok,
            "reason": server.check_reason,
            "time": server.check_time or None,
            "duration": round(server.check_duration, 6),
        },
        "counters": {
            "requests": server.requests,
            "responses": {f"{n}xx": server.responses[n] for n in range(1, 6)},
            "connect_failures": server.connect_failures,
            "failures": server.failures,
            "sent_bytes": server.sent_bytes,
            "received_bytes": server.received_bytes,
            "checks": {"success": server.checks[1], "failure": server.checks[0]},
            "transitions": dict(server.transitions),
        },
    }


def last_change(server: Server) -> dict[str, Any]:
    """What "since" means on the status page and in `lbproxy ctl status`: the server's latest change of
    state, of health (`since`) or of admin state (`admin_since`), whichever is later.

    `time` is null while neither has changed since lbproxy started; `reason` is the health
    transition's reason, or the admin state the operator set.
    """
    if not server.transition_time and not server.admin_time:
        return {"time": None, "kind": None, "reason": ""}
    if server.admin_time > server.transition_time:
        return {"time": server.admin_time, "kind": "admin", "reason": server.admin.value}
    return {"time": server.transition_time, "kind": "health", "reason": server.transition_reason}
