"""The admin server: liveness, readiness and the JSON API that operators and `lbproxy ctl` use.

An aiohttp application beside the proxy, on `admin.bind`. It reads the runtime objects (pools,
servers, their counters) and commands them through the runtime's methods (`drain`, `disable`,
`enable`); it never reaches into a protocol. Every error is JSON: `{"error": "..."}` with 400, 401,
403 or 404.

Writes (the POSTs) must carry a proof that a web page cannot forge, since a browser on the admin's
host (or at the end of an `ssh -L`) reaches a loopback port as well as `lbproxy ctl` does
(`write_refusal` has the rules): `Authorization: Bearer <admin.token>` when a token is set; without
one, only on a loopback bind, the header `X-Lbproxy-Admin` (a page of another origin cannot send it
without a CORS preflight, which lbproxy never grants) and a Host that is a loopback name (a page that
rebinds its own DNS name to 127.0.0.1 sends that name). A browser request from another origin is
refused in any case.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import importlib.resources
import ipaddress
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from lbproxy import __version__, build
from lbproxy.config import ServerConfig, server_from
from lbproxy.control import StartError
from lbproxy.etcd import EtcdError
from lbproxy.pool import WEIGHT_SCALE, Pool, Server
from lbproxy.server_changes import Refused


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

    def cluster_state(self) -> dict[str, Any] | None: ...

    async def share(self, pool: str, server: str, action: str, percent: int | None = None) -> bool: ...

    def set_weight(self, server: Server, percent: int) -> None: ...

    async def change_server(self, pool: str, name: str, server: ServerConfig | None, local: bool) -> bool: ...

    def server_changes(self) -> dict[str, Any]: ...


class Registry(Protocol):
    """What the admin side needs of the metrics registry (lbproxy.metrics.Registry)."""

    def register(self, collector: Collector) -> None: ...

    def unregister(self, collector: Collector) -> None: ...

    def snapshot(self) -> CollectorRegistry: ...


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
ENCODER: web.AppKey[concurrent.futures.Executor] = web.AppKey("encoder")
ACTIONS = ("drain", "disable", "enable")
ADMIN_HEADER = "X-Lbproxy-Admin"  # any value; `lbproxy ctl` sends 1


def make_app(runtime: Runtime, registry: Registry, token: str | None, loopback: bool) -> web.Application:
    """The admin application; `loopback` says whether it listens on a loopback address only.

    It adds `lbproxy_admin_refused_writes_total` to `registry` for as long as it runs.
    """
    app = web.Application(middlewares=[_json_errors])
    app[RUNTIME] = runtime
    app[REGISTRY] = registry
    # One thread encodes /metrics, one scrape after the other: scrapes never crowd the default
    # executor, where asyncio resolves names (probes, upstream connects).
    app[ENCODER] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lbproxy-metrics")
    refusals = Refusals()
    registry.register(refusals)

    async def cleanup(app: web.Application) -> None:
        registry.unregister(refusals)
        app[ENCODER].shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(cleanup)
    app.router.add_get("/", status_page)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/api/v1/listeners", listeners)
    app.router.add_get("/api/v1/pools", pools)
    app.router.add_get("/api/v1/cluster", cluster)
    app.router.add_get("/api/v1/pools/{pool}", pool)
    guarded = functools.partial(_guarded, token=token, loopback=loopback, refusals=refusals)
    app.router.add_post("/api/v1/pools/{pool}/servers", guarded(add_server))
    app.router.add_delete("/api/v1/pools/{pool}/servers/{server}", guarded(remove_server))
    app.router.add_post("/api/v1/pools/{pool}/servers/{server}/weight", guarded(weight))  # before {action}
    app.router.add_post("/api/v1/pools/{pool}/servers/{server}/{action}", guarded(action))
    app.router.add_post("/api/v1/reload", guarded(reload))
    return app


def is_loopback(host: str) -> bool:
    """Whether `host`, an address or a name, is the loopback interface: `localhost` is the only name."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


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


class Refusal(NamedTuple):
    status: int  # 401 or 403
    reason: str  # the label of lbproxy_admin_refused_writes_total: one of REFUSALS
    message: str


REFUSALS = ("cross_origin", "host", "header", "token", "off_loopback")


def write_refusal(headers: Mapping[str, str], token: str | None, loopback: bool) -> Refusal | None:
    """Why a write with these request headers is refused, or None when it may go ahead.

    A browser is the one client that can be made to send requests on someone else's behalf, and it
    says where a request comes from: a write from another origin is refused whatever it carries
    (Sec-Fetch-Site, else an Origin that is not the Host; a client that sends neither is no browser,
    or a browser on the same origin). Then the proof that the caller is not a page: the bearer token
    when `admin.token` is set (the Host is then free: DNS names, floating IPs, a reverse proxy).
    Without a token, writes are allowed on a loopback bind only, with the header ADMIN_HEADER, which
    no page of another origin can send (it makes the browser ask first, with a CORS preflight that
    lbproxy never grants), and with a Host that is a loopback address or `localhost`: a page that
    rebinds its own name to 127.0.0.1 is same-origin to itself, and sends that name. The Host's port
    is not checked: through `ssh -L 19090:127.0.0.1:9090` the caller's port is not the bind's.
    """
    host = headers.get("Host", "")
    fetch_site = headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none"):
        return Refusal(403, "cross_origin", f"cross-origin write refused (Sec-Fetch-Site: {fetch_site})")
    origin = headers.get("Origin")
    if origin is not None and urllib.parse.urlsplit(origin).netloc.lower() != host.lower():
        return Refusal(403, "cross_origin", f"cross-origin write refused: Origin {origin} is not this admin server")
    if token is not None:
        given = headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return Refusal(401, "token", "missing or wrong bearer token")
        return None
    if not loopback:
        return Refusal(403, "off_loopback", "writes are refused: set admin.token to allow them off loopback")
    if not is_loopback(_host_name(host)):
        return Refusal(
            403, "host", f"Host {host or '(none)'} is not a loopback name: use 127.0.0.1, [::1] or localhost"
        )
    if not headers.get(ADMIN_HEADER):
        return Refusal(403, "header", f"writes need the header {ADMIN_HEADER}: 1 (lbproxy ctl sends it)")
    return None


def _host_name(host: str) -> str:
    """The name or address of a Host header: `[::1]:9090` -> `::1`, `localhost:9090` -> `localhost`."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.partition(":")[0]


class Refusals(Collector):
    """Writes refused, by reason (REFUSALS): counted on the event loop, copied there for a scrape."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts = dict.fromkeys(REFUSALS, 0) | dict(counts or {})

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "lbproxy_admin_refused_writes",
            "Admin API writes refused, by reason: cross_origin, host (not a loopback name), header (no"
            " X-Lbproxy-Admin), token (missing or wrong), off_loopback (no admin.token).",
            labels=["reason"],
        )
        for reason, count in self.counts.items():
            refused.add_metric([reason], count)
        yield refused

    def snapshot(self) -> Refusals:
        return Refusals(self.counts)


_REFUSED = {401: web.HTTPUnauthorized, 403: web.HTTPForbidden}


def _guarded(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    token: str | None,
    loopback: bool,
    refusals: Refusals,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def checked(request: web.Request) -> web.StreamResponse:
        refusal = write_refusal(request.headers, token, loopback)
        if refusal is not None:
            refusals.counts[refusal.reason] += 1
            raise _error(_REFUSED[refusal.status], refusal.message)
        return await handler(request)

    return checked


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition, or OpenMetrics when the scraper asks for it.

    The counters are read on the loop, at once; the exposition is built and encoded in the ENCODER
    thread (tens of milliseconds for hundreds of servers), while the loop serves traffic.
    """
    await request.app[RUNTIME].refresh()
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    snapshot = request.app[REGISTRY].snapshot()
    body = await asyncio.get_running_loop().run_in_executor(request.app[ENCODER], encoder, snapshot)
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


def _write_operation(summary: str, *errors: int) -> dict[str, Any]:
    """An operation that writes: it needs the token, or the header on a loopback bind."""
    return {**_operation(summary, *errors), "security": WRITE_SECURITY}


def _operation(summary: str, *errors: int, body: str = "object") -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": {"type": body}}}}
    }
    for status in errors:
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    return {"summary": summary, "responses": responses}


_NAME = {"in": "path", "required": True, "schema": {"type": "string"}}
# A server added or removed at run time: refused by the auth rules, unknown, conflicting, etcd away or lagging
_FLEET_WRITE_ERRORS = (401, 403, 404, 409, 503, 504)
# Either proof will do: the token when admin.token is set; else the header, on a loopback bind only.
WRITE_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"adminHeader": []}]
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "lbproxy admin API", "version": "1"},
    "paths": {
        "/healthz": {"get": _operation("lbproxy itself is alive")},
        "/readyz": {"get": _operation("listeners bound and every server probed once (503 otherwise)", 503)},
        "/api/v1/listeners": {"get": _operation("every listener and its counters")},
        "/api/v1/pools": {"get": _operation("every pool, its policy and servers, with state and counters")},
        "/api/v1/cluster": {
            "get": _operation("the fleet of lbproxy nodes this node sees on etcd (cluster block)", 404)
        },
        "/api/v1/pools/{pool}": {
            "parameters": [{"name": "pool", **_NAME}],
            "get": _operation("one pool", 404),
        },
        "/api/v1/pools/{pool}/servers": {
            "parameters": [{"name": "pool", **_NAME}],
            "post": _write_operation(
                'add a server at run time, {"name", "address", "ratio"?, "backup"?, "max_connections"?}; '
                "201 once in force here. With a cluster block every node applies it (503 when etcd cannot "
                "take it); `?local=1`: this node only, until its restart",
                400,
                *_FLEET_WRITE_ERRORS,
            ),
        },
        "/api/v1/pools/{pool}/servers/{server}": {
            "parameters": [{"name": "pool", **_NAME}, {"name": "server", **_NAME}],
            "delete": _write_operation(
                "remove a server at run time (what it has in flight finishes); with a cluster block on "
                "every node (503 when etcd cannot take it); `?local=1`: this node only",
                *_FLEET_WRITE_ERRORS,
            ),
        },
        "/api/v1/pools/{pool}/servers/{server}/{action}": {
            "parameters": [
                {"name": "pool", **_NAME},
                {"name": "server", **_NAME},
                {"name": "action", "in": "path", "required": True, "schema": {"type": "string", "enum": list(ACTIONS)}},
            ],
            "post": _write_operation(
                "drain, disable or enable a server; answers its new state. With a cluster block every node "
                "applies it (503 when etcd cannot take it); `?local=1`: this node only",
                400,
                401,
                403,
                404,
                503,
            ),
        },
        "/api/v1/pools/{pool}/servers/{server}/weight": {
            "parameters": [{"name": "pool", **_NAME}, {"name": "server", **_NAME}],
            "post": _write_operation(
                'set the live weight, {"percent": 0-100} of the ratio; with a cluster block on every node '
                "(503 when etcd cannot take it); `?local=1`: this node only",
                400,
                401,
                403,
                404,
                503,
            ),
        },
        "/api/v1/reload": {
            "post": _write_operation("re-read the config file; 400 with the problems when it is refused", 400, 401, 403)
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "admin.token, when it is set"},
            "adminHeader": {
                "type": "apiKey",
                "in": "header",
                "name": ADMIN_HEADER,
                "description": "any value, e.g. 1: without admin.token, on a loopback bind, with a loopback Host",
            },
        },
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
                (403, "write refused: from another origin, no admin.token off loopback, foreign Host, no header"),
                (404, "unknown pool or server"),
                (409, "the change conflicts with the pool as it is (a name taken, min_up)"),
                (503, "not ready, or etcd cannot be reached (a fleet write, applied on no node)"),
                (504, "written to etcd, not yet seen back by this node's watch"),
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


async def cluster(request: web.Request) -> web.Response:
    state = request.app[RUNTIME].cluster_state()
    if state is None:  # 200, so that the status page asks without an error in the browser's console
        return web.json_response({"enabled": False, "message": "this node has no cluster block: it is on its own"})
    return web.json_response({"enabled": True, **state})


async def pools(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    await runtime.refresh()
    return web.json_response(
        {
            "pools": [pool_state(p) for p in runtime.pools.values()],
            "servers_changed": runtime.server_changes(),
            "lbproxy": {"version": __version__, "build": build.RUNNING, "described": build.described()},
        }
    )


async def pool(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    await runtime.refresh()
    found = runtime.pools.get(request.match_info["pool"])
    if found is None:
        raise _error(web.HTTPNotFound, f"no pool named {request.match_info['pool']!r}")
    return web.json_response(pool_state(found))


async def action(request: web.Request) -> web.Response:
    name = request.match_info["action"]
    if name not in ACTIONS:
        raise _error(web.HTTPBadRequest, f"unknown action {name!r}: use one of {', '.join(ACTIONS)}")
    runtime = request.app[RUNTIME]
    server = _server(request)
    return await _applied(request, server, name, None, lambda: getattr(runtime, name)(server))


async def weight(request: web.Request) -> web.Response:
    """The server's live weight, as a percentage of its ratio (`{"percent": 0-100}`); with a cluster
    block, on every node (see `_applied`)."""
    server = _server(request)
    try:
        body = await request.json()
        percent = body["percent"]
    except (ValueError, KeyError, TypeError):
        raise _error(web.HTTPBadRequest, 'expected a JSON body {"percent": 0-100}') from None
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise _error(web.HTTPBadRequest, f"percent must be an integer from 0 to 100, got {percent!r}")
    runtime = request.app[RUNTIME]
    return await _applied(request, server, "weight", percent, lambda: runtime.set_weight(server, percent))


def _server(request: web.Request) -> Server:
    try:
        return request.app[RUNTIME].server(request.match_info["pool"], request.match_info["server"])
    except KeyError as error:
        raise _error(web.HTTPNotFound, str(error.args[0])) from None


async def _applied(
    request: web.Request, server: Server, name: str, percent: int | None, apply: Callable[[], None]
) -> web.Response:
    """Apply an admin action: with a cluster block, written to etcd first so that every node applies
    it (cluster.py), refused (503) when etcd cannot take it; `?local=1`: this node only, on purpose."""
    runtime = request.app[RUNTIME]
    fleet = False
    if request.query.get("local") != "1":
        try:
            fleet = await runtime.share(server.pool.name, server.name, name, percent)
        except EtcdError as error:
            raise _error(
                web.HTTPServiceUnavailable,
                f"etcd cannot be reached, so {name} was applied on no node ({error}); "
                "`lbproxy ctl --local` applies it on this node only",
            ) from None
    apply()  # at once here; the other nodes from their watch
    await runtime.refresh()  # with workers: their in-flight counts
    return web.json_response({**server_state(server), "applied_on": "fleet" if fleet else "this node"})


async def add_server(request: web.Request) -> web.Response:
    """A server added at run time: `{"name", "address", "ratio"?, "backup"?, "max_connections"?}`, checked
    as the file's are; 201 once in force on this node (with a cluster block: written to etcd, every node
    applies it)."""
    try:
        body = await request.json()
    except ValueError:
        raise _error(web.HTTPBadRequest, "expected a JSON object with name and address") from None
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "expected a JSON object with name and address")
    try:
        server = server_from(body)
    except ValueError as error:
        raise _error(web.HTTPBadRequest, str(error)) from None
    pool = request.match_info["pool"]
    fleet = await _changed(request, pool, server.name, server)
    found = request.app[RUNTIME].pools[pool].by_name[server.name]
    return web.json_response(
        {"applied_on": "fleet" if fleet else "this node", "server": server_state(found)}, status=201
    )


async def remove_server(request: web.Request) -> web.Response:
    """A server removed at run time; what it has in flight finishes (as when a reload removes it)."""
    pool, name = request.match_info["pool"], request.match_info["server"]
    fleet = await _changed(request, pool, name, None)
    return web.json_response({"applied_on": "fleet" if fleet else "this node", "removed": f"{pool}/{name}"})


async def _changed(request: web.Request, pool: str, name: str, server: ServerConfig | None) -> bool:
    """Add or remove a server through the runtime, its refusals as HTTP errors; True: on the fleet."""
    what = "added" if server is not None else "removed"
    try:
        return await request.app[RUNTIME].change_server(pool, name, server, request.query.get("local") == "1")
    except Refused as error:
        raise _error(web.HTTPNotFound if error.missing else web.HTTPConflict, str(error)) from None
    except OSError as error:
        raise _error(web.HTTPBadRequest, f"address: cannot resolve it: {error.strerror or error}") from None
    except EtcdError as error:
        raise _error(
            web.HTTPServiceUnavailable,
            f"etcd cannot be reached, so {pool}/{name} was {what} on no node ({error}); "
            "`lbproxy ctl --local` applies it on this node only",
        ) from None
    except TimeoutError:  # written, but this node's watch lags: the fleet applies it as its watches see it
        raise _error(
            web.HTTPGatewayTimeout,
            f"{pool}/{name} is written to etcd, but this node has not seen it back yet: "
            "every node applies it when its watch does (GET /api/v1/pools shows when)",
        ) from None
    except StartError as error:
        raise _error(web.HTTPInternalServerError, f"{pool}/{name} could not be {what} here: {error}") from None


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
        "persistence": _persistence(pool),
        "queue": _queue(pool),
        "hedge": {"after": pool.hedging.after, **pool.hedging.results} if pool.hedging is not None else None,
        "servers": [server_state(server) for server in pool.servers],
    }


def _queue(pool: Pool) -> dict[str, Any] | None:
    queue = pool.queue
    if queue is None:
        return None
    return {
        "length": queue.length,
        "max_size": queue.max_size,
        "timeout": queue.timeout,
        "rejections": dict(queue.rejections),
        "served": sum(queue.waits),
    }


def _persistence(pool: Pool) -> dict[str, Any] | None:
    persistence = pool.persistence
    if persistence is None:
        return None
    return {
        "type": persistence.kind,
        "hits": persistence.hits,
        "misses": persistence.misses,
        "redispatches": persistence.redispatches,
    }


def server_state(server: Server) -> dict[str, Any]:
    counters: dict[str, Any] = {
        "requests": server.requests,
        "responses": {f"{n}xx": server.responses[n] for n in range(1, 6)},
        "connect_failures": server.connect_failures,
        "failures": server.failures,
        "sent_bytes": server.sent_bytes,
        "received_bytes": server.received_bytes,
        "checks": {"success": server.checks[1], "failure": server.checks[0]},
        "transitions": dict(server.transitions),
    }
    if server.endpoint.tls is not None:  # new connections, and how many resumed a TLS session
        counters["tls"] = {"handshakes": server.tls_handshakes, "resumed": server.tls_resumptions}
    return {
        "name": server.name,
        "address": str(server.address),
        "ratio": server.ratio,
        "weight": server.weight / WEIGHT_SCALE,  # live, in ratio units
        "backup": server.backup,
        "max_connections": server.max_connections or None,
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
        "counters": counters,
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
