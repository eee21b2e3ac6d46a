"""The running load balancer: pools, servers and listeners built from a `Config`, and their lifetime.

Data flows one way: the config (frozen, no sockets) becomes runtime objects here (pools of servers
with their policies, listeners with their settings and counters), and the protocols are handed those
objects. The runtime resolves server host names, binds the listening sockets, drives the deadline
ticks, reloads a new config in place (servers that stay keep their state and counters), keeps the
admin state in the state file, and shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lbproxy import admin, config, metrics
from lbproxy.config import Config, ListenerConfig
from lbproxy.health import HealthChecks
from lbproxy.http_proxy import HttpListener, HttpProxy
from lbproxy.pool import AdminState, Pool, Server
from lbproxy.tcp_proxy import TcpClient, TcpListener

log = logging.getLogger("lbproxy")

TICK = 0.25  # seconds between deadline checks: the precision of every client and server timeout

Listener = HttpListener | TcpListener


class StartError(Exception):
    """The runtime could not be built or bound; the message says what and where."""


@dataclass(frozen=True, slots=True)
class Bound:
    """Where a listener actually listens (the kernel's port when the config said port 0)."""

    name: str
    host: str
    port: int
    scheme: str


class Runtime:
    """Everything one running lbproxy owns; `start()` binds, `reload()` re-reads, `shutdown()` ends."""

    def __init__(self, config: Config, serve: bool = True, manage: bool = True) -> None:
        """`serve`: bind the listeners and carry traffic; `manage`: run the probes, the admin server and
        the state file. One process does both; with --workers, each worker serves and the supervisor
        manages (lbproxy.workers)."""
        self.config = config
        self.serve = serve
        self.manage = manage
        self.refresh_hook: Callable[[], Awaitable[None]] | None = None  # the supervisor's, before reads
        self.listener_totals: Mapping[str, Any] = {}  # the supervisor's sums over its workers
        self.cut_hook: Callable[[Server], None] | None = None  # the supervisor's: its workers cut
        self._contexts: dict[str, ssl.SSLContext] = {}  # per TLS listener, reloaded in place
        self._was_ready = False
        self.shutting_down = False
        self.pools = _build_pools(config, None)
        self.health = HealthChecks()
        self.listeners: dict[str, Listener] = {}
        self.bound: dict[str, Bound] = {}
        self.reloads: dict[str, int] = {"success": 0, "failure": 0}
        self.last_reload_ok = True
        self.registry = metrics.registry(self)
        self._sockets: dict[str, asyncio.Server] = {}
        self._grace: dict[Server, asyncio.TimerHandle] = {}
        self._admin: web.AppRunner | None = None
        self._bound_all = False
        self._ticker: asyncio.Task[None] | None = None
        self._log_handlers: dict[str, logging.Handler] = {}
        self._retired: list[Listener] = []  # removed by a reload, until their connections end

    # -- start and stop --

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await _resolve(loop, self.pools)
        if self.manage:
            self._restore_state()
            for name, pool in self.pools.items():
                self.health.add(pool, self.config.pools[name].health)
            self.health.start()
        try:
            for listener in self.config.listeners if self.serve else ():
                built, context = self._make_listener(loop, listener, self.config, self.pools)
                await self._bind(loop, listener, built, context)
            if self.manage and self.config.admin is not None:
                await self._serve_admin(self.config.admin.bind.host, self.config.admin.bind.port)
        except BaseException:
            await self.stop()
            raise
        self._bound_all = True
        self._ticker = loop.create_task(self._tick(loop))

    @property
    def ready(self) -> bool:
        """Listeners bound and every server probed once (the admin's /readyz)."""
        # Once ready, a reload's new probes do not make it unready again; shutting down does.
        self._was_ready = self._was_ready or (self._bound_all and self.health.probed_all())
        return self._was_ready and self.workers_ready and not self.shutting_down

    workers_ready = True  # the supervisor lowers it until every worker has bound its listeners

    async def refresh(self) -> None:
        """Bring counters up to date before the admin side reads them (sums over workers)."""
        if self.refresh_hook is not None:
            await self.refresh_hook()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests and connections finish within `timeout`, then stop."""
        self.shutting_down = True  # /readyz answers 503 from now on
        log.info("shutting down: waiting up to %gs for %d connections", timeout, self._open_connections())
        for server in self._sockets.values():
            server.close()
        for listener in self._all_listeners():
            if isinstance(listener, HttpListener):
                listener.drain_connections()
        deadline = time.monotonic() + timeout
        while self._open_connections() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # connections end in protocol callbacks: polling is simplest
        left = self._open_connections()
        if left:
            log.warning("shutdown: %d connections still open after %gs: closing them", left, timeout)
        await self.stop()

    async def stop(self) -> None:
        """Close everything now."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for handle in self._grace.values():
            handle.cancel()
        self._grace.clear()
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        await self.health.stop()
        for server in self._sockets.values():
            server.close()
        for listener in self._all_listeners():
            listener.close_idle()
            connections: list[HttpProxy | TcpClient] = list(listener.connections)
            for connection in connections:
                if connection.transport is not None:
                    connection.transport.abort()
        for server in self._sockets.values():
            await server.wait_closed()
        self._sockets.clear()
        for handler in self._log_handlers.values():
            handler.close()  # an unclosed log file is a ResourceWarning
        self._log_handlers.clear()

    def _all_listeners(self) -> list[Listener]:
        return [*self.listeners.values(), *self._retired]

    def _open_connections(self) -> int:
        return sum(len(listener.connections) for listener in self._all_listeners())

    # -- reload --

    async def reload(self) -> list[str]:
        """Re-read the config file and apply it in place; returns the problems (empty: success).

        An invalid file changes nothing. Listeners added are bound, removed ones closed (their open
        connections finish), changed ones updated; servers that stay keep health, admin state and
        counters; in-flight requests are not interrupted.
        """
        loop = asyncio.get_running_loop()
        try:
            new = config.load(self.config.path)
        except config.ConfigError as error:
            return self._reload_failed([str(problem) for problem in error.problems])
        # Building the new pools reconfigures the servers that stay: keep what to put back if the
        # reload fails before it is installed.
        saved = [(server, server.saved()) for pool in self.pools.values() for server in pool.servers]
        pools = _build_pools(new, self.pools)
        try:
            await _resolve(loop, pools)
        except StartError as error:
            return self._reload_failed([str(error)], saved)
        serving = self.config.listeners if self.serve else ()
        old_listeners = {listener.name: listener for listener in serving}
        new_listeners = {listener.name: listener for listener in (new.listeners if self.serve else ())}
        rebind = [
            listener
            for name, listener in new_listeners.items()
            if name not in old_listeners or _socket_changed(old_listeners[name], listener)
        ]
        built: dict[str, tuple[Listener, ssl.SSLContext | None]] = {}
        try:
            for listener in new_listeners.values():
                built[listener.name] = self._make_listener(loop, listener, new, pools)
        except StartError as error:
            return self._reload_failed([str(error)], saved)
        # Bind the new sockets first: if one cannot be bound, nothing has changed yet.
        fresh: dict[str, asyncio.Server] = {}
        for listener in rebind:
            old = old_listeners.get(listener.name)
            if old is not None and old.bind == listener.bind:
                continue  # same address, other mode or TLS: rebound after the old socket closes
            try:
                fresh[listener.name] = await self._create_server(loop, listener, *built[listener.name])
            except StartError as error:
                for server in fresh.values():
                    server.close()
                return self._reload_failed([str(error)], saved)

        await self.health.stop()
        self.health = HealthChecks()
        self.pools = pools
        for name in list(self.listeners):
            if name not in new_listeners or new_listeners[name] in rebind:
                self._retire(name)
        for listener in new_listeners.values():
            made, context = built[listener.name]
            if listener in rebind:
                if listener.name in fresh:
                    self._adopt(listener, made, fresh[listener.name], context)
                else:
                    try:  # same address, other mode or TLS: the old socket had to close first
                        await self._bind(loop, listener, made, context)
                    except StartError as error:
                        log.error("reload: listener %s is not listening any more: %s", listener.name, error)
            else:
                current = self.listeners[listener.name]
                if listener.tls is not None and listener.name in self._contexts:
                    try:  # a renewed certificate under the same paths: new handshakes use it
                        self._contexts[listener.name].load_cert_chain(listener.tls.cert, listener.tls.key)
                    except (OSError, ssl.SSLError) as error:
                        log.error("reload: listener %s keeps its old certificate: %s", listener.name, error)
                if isinstance(current, HttpListener) and isinstance(made, HttpListener):
                    current.reconfigure(made)
                elif isinstance(current, TcpListener) and isinstance(made, TcpListener):
                    current.reconfigure(made)  # the same call, typed for each listener class
        for listener_object in self._all_listeners():
            if isinstance(listener_object, HttpListener):
                listener_object.forget_servers({s for pool in pools.values() for s in pool.servers})
        if self.manage:
            for name, pool in pools.items():
                self.health.add(pool, new.pools[name].health)
            self.health.start()
        self.config = new
        self._save_state()  # servers gone from the config leave the state file too
        self.reloads["success"] += 1
        self.last_reload_ok = True
        log.info("reload: %s", new.summary())
        return []

    def _reload_failed(self, problems: list[str], saved: Sequence[tuple[Server, tuple[Any, ...]]] = ()) -> list[str]:
        for server, state in saved:
            server.restore(state)
        self.reloads["failure"] += 1
        self.last_reload_ok = False
        for problem in problems:
            log.error("reload refused, the running config stays: %s", problem)
        return problems

    def _retire(self, name: str) -> None:
        """Close a listener's socket; its open connections finish on their own."""
        listener = self.listeners.pop(name)
        server = self._sockets.pop(name)
        server.close()
        self.bound.pop(name, None)
        if isinstance(listener, HttpListener):
            listener.drain_connections()
        self._retired.append(listener)
        log.info("listener %s: closed by a reload; %d connections finish", name, len(listener.connections))

    # -- listeners --

    def _make_listener(
        self, loop: asyncio.AbstractEventLoop, config: ListenerConfig, whole: Config, pools: Mapping[str, Pool]
    ) -> tuple[Listener, ssl.SSLContext | None]:
        """A listener object for `config` (of the config `whole`), on the runtime pools `pools`."""
        pool_config = whole.pools[config.pool]
        pool = pools[config.pool]
        if config.mode == "tcp":
            tcp = TcpListener(
                config.name,
                pool,
                loop=loop,
                max_connections=config.max_connections,
                idle_timeout=config.idle_timeout,
                connect_timeout=pool_config.timeouts.connect,
                accept_proxy=config.accept_proxy,
                send_proxy=pool_config.send_proxy,
            )
            return tcp, None
        maintenance = config.maintenance_page.read_bytes() if config.maintenance_page is not None else None
        listener = HttpListener(
            config.name,
            pool,
            loop=loop,
            tls=config.tls is not None,
            forwarded=config.forwarded_headers,
            maintenance=maintenance,
            retry_after=config.retry_after,
            max_connections=config.max_connections,
            header_timeout=config.timeouts.request_header,
            keepalive_timeout=config.timeouts.keepalive,
            body_timeout=config.timeouts.request_body,
            connect_timeout=pool_config.timeouts.connect,
            response_timeout=pool_config.timeouts.response,
            max_header_size=config.limits.header_size,
            max_header_count=config.limits.header_count,
            max_target=config.limits.target_size,
            max_body=config.limits.max_body_size,
            max_idle=pool_config.keepalive.max_idle,
            idle_timeout=pool_config.keepalive.idle_timeout,
            access_log=self._access_logger(config),
            accept_proxy=config.accept_proxy,
        )
        context = None
        if config.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(config.tls.cert, config.tls.key)
            except (OSError, ssl.SSLError) as error:
                raise StartError(f"listener {config.name}: cannot load the TLS certificate or key: {error}") from None
        return listener, context

    async def _create_server(
        self,
        loop: asyncio.AbstractEventLoop,
        config: ListenerConfig,
        listener: Listener,
        context: ssl.SSLContext | None,
    ) -> asyncio.Server:
        try:
            return await loop.create_server(
                listener,
                config.bind.host or None,
                config.bind.port,
                ssl=context,
                reuse_address=True,
                reuse_port=not self.manage,  # workers share each listening port (SO_REUSEPORT)
                backlog=1024,
            )
        except OSError as error:
            raise StartError(f"listener {config.name}: cannot bind {config.bind}: {error.strerror}") from None

    async def _bind(
        self,
        loop: asyncio.AbstractEventLoop,
        config: ListenerConfig,
        listener: Listener,
        context: ssl.SSLContext | None,
    ) -> None:
        self._adopt(config, listener, await self._create_server(loop, config, listener, context), context)

    def _adopt(
        self, config: ListenerConfig, listener: Listener, server: asyncio.Server, context: ssl.SSLContext | None = None
    ) -> None:
        self._sockets[config.name] = server
        if context is not None:
            self._contexts[config.name] = context
        self.listeners[config.name] = listener
        sockname = server.sockets[0].getsockname()
        scheme = "tcp" if config.mode == "tcp" else "https" if config.tls is not None else "http"
        self.bound[config.name] = Bound(config.name, str(sockname[0]), int(sockname[1]), scheme)
        log.info("listener %s: %s on %s:%d, pool %s", config.name, scheme, sockname[0], sockname[1], config.pool)

    def _access_logger(self, config: ListenerConfig) -> logging.Logger | None:
        if config.access_log is None:
            return None
        logger = logging.getLogger(f"lbproxy.access.{config.name}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        key = f"{config.name}:{config.access_log}"
        if key in self._log_handlers:
            return logger  # a reload that keeps the same log keeps its handler
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        handler: logging.Handler
        if config.access_log == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            try:
                handler = logging.FileHandler(config.access_log, encoding="utf-8")
            except OSError as error:
                raise StartError(f"listener {config.name}: cannot open the access log: {error}") from None
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        self._log_handlers[key] = handler
        return logger

    async def _serve_admin(self, host: str, port: int) -> None:
        assert self.config.admin is not None
        app = admin.make_app(self, self.registry, self.config.admin.token, admin.is_loopback(host))
        self._admin = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin.setup()
        site = web.TCPSite(self._admin, host or None, port, reuse_address=True)
        try:
            await site.start()
        except OSError as error:
            raise StartError(f"admin: cannot bind {host}:{port}: {error.strerror}") from None
        sockname = self._admin.addresses[0]
        self.bound["admin"] = Bound("admin", str(sockname[0]), int(sockname[1]), "http")
        log.info("admin: http on %s:%d", sockname[0], sockname[1])

    async def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = loop.time()
            for listener in self._all_listeners():
                listener.tick(now)
            for listener in self._retired:
                if not listener.connections:
                    listener.close_idle()
            self._retired = [listener for listener in self._retired if listener.connections]
            monotonic = time.monotonic()
            for pool in self.pools.values():
                pool.tick(monotonic)

    # -- admin operations (the API and `lbproxy ctl` call these) --

    def listener_states(self) -> list[dict[str, Any]]:
        if not self.serve:  # the supervisor: the workers' sums
            binds = {
                listener.name: f"{'tcp' if listener.mode == 'tcp' else 'https' if listener.tls else 'http'}://"
                f"{listener.bind}"
                for listener in self.config.listeners
            }
            return [
                {"name": name, "bind": binds.get(name, ""), **totals.state()}
                for name, totals in self.listener_totals.items()
            ]
        states = []
        for name, listener in self.listeners.items():
            bound = self.bound[name]
            states.append({"name": name, "bind": f"{bound.scheme}://{bound.host}:{bound.port}", **listener.state()})
        return states

    def server(self, pool: str, server: str) -> Server:
        """The server `server` of pool `pool`; KeyError names what is unknown."""
        if pool not in self.pools:
            raise KeyError(f"no pool named {pool!r}")
        found = self.pools[pool].by_name.get(server)
        if found is None:
            raise KeyError(f"pool {pool!r} has no server named {server!r}")
        return found

    def drain(self, server: Server) -> None:
        """No new requests or connections; what is in flight finishes."""
        self._cancel_grace(server)
        server.pool.set_admin(server, AdminState.DRAINING)
        self._save_state()

    def disable(self, server: Server) -> None:
        """As drain, then whatever is still in flight after the pool's disable_grace is cut."""
        self._cancel_grace(server)
        server.pool.set_admin(server, AdminState.DISABLED)
        loop = asyncio.get_running_loop()
        self._grace[server] = loop.call_later(server.pool.disable_grace, self._cut, server)
        self._save_state()

    def enable(self, server: Server) -> None:
        self._cancel_grace(server)
        server.pool.set_admin(server, AdminState.ENABLED)
        self._save_state()

    def _cancel_grace(self, server: Server) -> None:
        handle = self._grace.pop(server, None)
        if handle is not None:
            handle.cancel()

    def _cut(self, server: Server) -> None:
        self._grace.pop(server, None)
        if self.cut_hook is not None:
            self.cut_hook(server)  # the workers hold the connections
        cut = sum(listener.cut_server(server) for listener in self._all_listeners())
        if cut:
            log.warning(
                "pool %s: server %s disabled: %d connections cut after the grace time",
                server.pool.name,
                server.name,
                cut,
            )

    # -- the state file: admin state across restarts --

    def _save_state(self) -> None:
        """Write every drained or disabled server to the state file, atomically."""
        path = self.config.state_file
        if path is None:
            return
        states = {
            f"{pool.name}/{server.name}": server.admin.value
            for pool in self.pools.values()
            for server in pool.servers
            if server.admin is not AdminState.ENABLED
        }
        text = json.dumps({"version": 1, "servers": states}, indent=2, sort_keys=True) + "\n"
        try:
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)  # readers see the old file or the new one, never half of one
        except OSError as error:
            log.error("cannot write the state file %s: %s", path, error)

    def _restore_state(self) -> None:
        path = self.config.state_file
        if path is None or not path.exists():
            return
        try:
            states = json.loads(path.read_text(encoding="utf-8"))["servers"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.error("cannot read the state file %s, starting with every server enabled: %s", path, error)
            return
        for key, value in states.items():
            pool_name, _, server_name = str(key).partition("/")
            pool = self.pools.get(pool_name)
            server = pool.by_name.get(server_name) if pool is not None else None
            if server is None or value not in ("draining", "disabled"):
                continue
            assert pool is not None
            pool.set_admin(server, AdminState(value))
            log.info("state file: pool %s: server %s starts %s", pool_name, server_name, value)


def _build_pools(config: Config, previous: Mapping[str, Pool] | None) -> dict[str, Pool]:
    """The runtime pools of `config`; on a reload, `previous` holds the running ones."""
    reloading = previous is not None
    old = previous or {}
    pools = {name: Pool(pool, old.get(name), reloading) for name, pool in config.pools.items()}
    for name, pool in config.pools.items():
        if pool.backup_pool is not None:
            pools[name].fail_over_to(pools[pool.backup_pool])
    return pools


def _socket_changed(old: ListenerConfig, new: ListenerConfig) -> bool:
    """Whether a listener needs a new socket (its address, mode or TLS changed)."""
    return old.bind != new.bind or old.mode != new.mode or old.tls != new.tls


async def _resolve(loop: asyncio.AbstractEventLoop, pools: Mapping[str, Pool]) -> None:
    """Replace server host names by an address, at start and on reload, with `config.resolve` (which
    `lbproxy check` uses too), in a thread: the system resolver blocks."""
    for pool in pools.values():
        for server in pool.servers:
            host = server.address.host
            try:
                server.connect_host = await loop.run_in_executor(None, config.resolve, server.address)
            except OSError as error:
                reason = error.strerror or error
                raise StartError(
                    f"pools.{pool.name}: server {server.name}: cannot resolve {host!r}: {reason}"
                ) from None
