"""The running load balancer: pools, servers and listeners built from a `Config`, and their lifetime.

Data flows one way: the config (frozen, no sockets) becomes runtime objects here (pools of servers
with their policies, listeners with their settings and counters), and the protocols are handed those
objects. The runtime resolves server host names, binds the listening sockets, drives the listeners'
deadline ticks and closes everything on stop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lbproxy import admin, metrics
from lbproxy.config import Config, ListenerConfig
from lbproxy.health import HealthChecks
from lbproxy.http_proxy import HttpListener, HttpProxy
from lbproxy.pool import AdminState, Pool, Server
from lbproxy.tcp_proxy import TcpClient, TcpListener

log = logging.getLogger("lbproxy")

TICK = 0.25  # seconds between deadline checks: the precision of every client and server timeout


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
    """Everything one running lbproxy owns; `start()` binds, `stop()` closes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools = {name: Pool(pool) for name, pool in config.pools.items()}
        for name, pool in config.pools.items():
            if pool.backup_pool is not None:
                self.pools[name].backup_pool = self.pools[pool.backup_pool]
        self.health = HealthChecks()
        self.listeners: dict[str, HttpListener | TcpListener] = {}
        self._grace: dict[Server, asyncio.TimerHandle] = {}
        self._admin: web.AppRunner | None = None
        self.reloads: dict[str, int] = {"success": 0, "failure": 0}
        self.registry = metrics.registry(self)
        self._bound_all = False
        self.bound: dict[str, Bound] = {}
        self._servers: list[asyncio.Server] = []
        self._ticker: asyncio.Task[None] | None = None
        self._log_handlers: list[logging.Handler] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self._resolve(loop)
        for name, pool in self.pools.items():
            self.health.add(pool, self.config.pools[name].health)
        self.health.start()
        try:
            for listener in self.config.listeners:
                await self._listen(loop, listener)
            if self.config.admin is not None:
                await self._serve_admin(self.config.admin.bind.host, self.config.admin.bind.port)
        except BaseException:
            await self.stop()
            raise
        self._bound_all = True
        self._ticker = loop.create_task(self._tick(loop))

    @property
    def ready(self) -> bool:
        """Listeners bound and every server probed once (the admin's /readyz)."""
        return self._bound_all and self.health.probed_all()

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

    async def stop(self) -> None:
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
        for server in self._servers:
            server.close()
        for listener in self.listeners.values():
            listener.close_idle()
            connections: list[HttpProxy | TcpClient] = list(listener.connections)
            for connection in connections:
                if connection.transport is not None:
                    connection.transport.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for handler in self._log_handlers:
            handler.close()  # an unclosed log file is a ResourceWarning
        self._log_handlers.clear()

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> None:
        """Replace server host names by an address, once, at start (as HAProxy's init-addr does)."""
        for pool in self.pools.values():
            for server in pool.servers:
                host = server.address.host
                try:
                    ipaddress.ip_address(host)
                    continue
                except ValueError:
                    pass
                try:
                    infos = await loop.getaddrinfo(host, server.address.port, type=socket.SOCK_STREAM)
                except OSError as error:
                    raise StartError(
                        f"pools.{pool.name}: server {server.name}: cannot resolve {host!r}: {error}"
                    ) from None
                server.connect_host = str(infos[0][4][0])

    async def _listen(self, loop: asyncio.AbstractEventLoop, config: ListenerConfig) -> None:
        pool_config = self.config.pools[config.pool]
        if config.mode == "tcp":
            tcp = TcpListener(
                config.name,
                self.pools[config.pool],
                loop=loop,
                max_connections=config.max_connections,
                idle_timeout=config.idle_timeout,
                connect_timeout=pool_config.timeouts.connect,
                accept_proxy=config.accept_proxy,
                send_proxy=pool_config.send_proxy,
            )
            await self._bind(loop, config, tcp, None)
            return
        maintenance = config.maintenance_page.read_bytes() if config.maintenance_page is not None else None
        listener = HttpListener(
            config.name,
            self.pools[config.pool],
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
        await self._bind(loop, config, listener, context)

    async def _bind(
        self,
        loop: asyncio.AbstractEventLoop,
        config: ListenerConfig,
        listener: HttpListener | TcpListener,
        context: ssl.SSLContext | None,
    ) -> None:
        host = config.bind.host or None
        try:
            server = await loop.create_server(
                listener, host, config.bind.port, ssl=context, reuse_address=True, backlog=1024
            )
        except OSError as error:
            raise StartError(f"listener {config.name}: cannot bind {config.bind}: {error.strerror}") from None
        self._servers.append(server)
        self.listeners[config.name] = listener
        sockname = server.sockets[0].getsockname()
        scheme = "https" if context is not None else "http"
        self.bound[config.name] = Bound(config.name, str(sockname[0]), int(sockname[1]), scheme)
        scheme = "tcp" if config.mode == "tcp" else scheme
        self.bound[config.name] = Bound(config.name, str(sockname[0]), int(sockname[1]), scheme)
        log.info("listener %s: %s on %s:%d, pool %s", config.name, scheme, sockname[0], sockname[1], config.pool)

    def _access_logger(self, config: ListenerConfig) -> logging.Logger | None:
        if config.access_log is None:
            return None
        logger = logging.getLogger(f"lbproxy.access.{config.name}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
            old.close()
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
        self._log_handlers.append(handler)
        return logger

    async def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = loop.time()
            for listener in self.listeners.values():
                listener.tick(now)
            monotonic = time.monotonic()
            for pool in self.pools.values():
                pool.tick(monotonic)

    # -- admin operations (the API and `lbproxy ctl` call these) --

    def listener_states(self) -> list[dict[str, Any]]:
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

    def disable(self, server: Server) -> None:
        """As drain, then whatever is still in flight after the pool's disable_grace is cut."""
        self._cancel_grace(server)
        server.pool.set_admin(server, AdminState.DISABLED)
        loop = asyncio.get_running_loop()
        self._grace[server] = loop.call_later(server.pool.disable_grace, self._cut, server)

    def enable(self, server: Server) -> None:
        self._cancel_grace(server)
        server.pool.set_admin(server, AdminState.ENABLED)

    def _cancel_grace(self, server: Server) -> None:
        handle = self._grace.pop(server, None)
        if handle is not None:
            handle.cancel()

    def _cut(self, server: Server) -> None:
        self._grace.pop(server, None)
        cut = sum(listener.cut_server(server) for listener in self.listeners.values())
        if cut:
            log.warning(
                "pool %s: server %s disabled: %d connections cut after the grace time",
                server.pool.name,
                server.name,
                cut,
            )
