"""The running load balancer: listeners built from a `Config` on the controller's pools, and their lifetime.

Data flows one way: the config (frozen, no sockets) becomes runtime objects (pools of servers with
their policies, listeners with their settings and counters), and the protocols are handed those
objects. The pools, the probes, the admin state and the state file belong to the control plane
(`control.Controller`, which the runtime owns and through which every reload and admin action goes);
the runtime owns the sockets: it binds the listeners, builds their side of a reload beside the live
ones (`_ListenerStage`), drives the deadline ticks, serves the admin API, and shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lbproxy import admin, metrics, server_changes
from lbproxy.cluster import Cluster, config_hash
from lbproxy.config import Config, ListenerConfig, ServerConfig, resolve, server_fields
from lbproxy.control import Controller, Hosts, Stage
from lbproxy.control import StartError as StartError  # re-exported: cli and workers catch it from here
from lbproxy.handshake import Acceptor
from lbproxy.health import HealthChecks
from lbproxy.http_proxy import HttpListener, HttpProxy
from lbproxy.limits import RateLimiter, TrustedProxies
from lbproxy.pool import AdminState, Pool, Server
from lbproxy.routing import RouteTable
from lbproxy.selection import RateLimit
from lbproxy.server_changes import Changes
from lbproxy.tcp_proxy import TcpClient, TcpListener
from lbproxy.tls import ListenerContexts, TlsError, expiries

log = logging.getLogger("lbproxy")

TICK = 0.25  # seconds between deadline checks: the precision of every client and server timeout

Listener = HttpListener | TcpListener


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
        self.serve = serve
        self.manage = manage
        self.controller = Controller(config, manage, self._cut)  # the pools, probes, admin state, state file
        self.refresh_hook: Callable[[], Awaitable[None]] | None = None  # the supervisor's, before reads
        self.listener_totals: Mapping[str, Any] = {}  # the supervisor's sums over its workers
        self.cut_hook: Callable[[Server], None] | None = None  # the supervisor's: its workers cut
        # With --workers, the other side's part of a reload, built after the listeners' (lbproxy.workers):
        # the supervisor's has every worker build and bind it; a worker's waits for the supervisor's word.
        self.stage_hook: Callable[[Config, Mapping[str, Pool], Hosts], Awaitable[Stage]] | None = None
        self._contexts: dict[str, ListenerContexts] = {}  # per TLS listener, reloaded in place
        self._was_ready = False
        self.shutting_down = False
        self.listeners: dict[str, Listener] = {}
        self.bound: dict[str, Bound] = {}
        self.registry = metrics.registry(self)
        self._sockets: dict[str, asyncio.Server] = {}
        self._admin: web.AppRunner | None = None
        self._bound_all = False
        self._ticker: asyncio.Task[None] | None = None
        self.cluster: Cluster | None = None  # with a `cluster` block, on the control plane's node
        # Servers changed at run time (server_changes), the two layers: the fleet's (etcd's, set by the
        # cluster) and this node's own, on top; the controller applies both.
        self.fleet_servers: Changes = {}
        self.local_servers: dict[tuple[str, str], ServerConfig | None] = {}
        self._applying: set[asyncio.Task[list[str]]] = set()  # the fleet's changes being applied
        self._log_handlers: dict[str, logging.Handler] = {}
        self._retired: list[Listener] = []  # removed by a reload, until their connections end
        self._stopped = False

    # -- what the controller owns, as the admin side, metrics and the workers read it --

    @property
    def config(self) -> Config:
        """The config in force: the last one committed."""
        return self.controller.config

    @property
    def pools(self) -> dict[str, Pool]:
        """The live pools, by name; a reload's commit replaces them all at once."""
        return self.controller.pools

    @property
    def health(self) -> HealthChecks:
        """The probe loops of the live pools."""
        return self.controller.health

    @property
    def reloads(self) -> dict[str, int]:
        return self.controller.reloads

    @property
    def last_reload_ok(self) -> bool:
        return self.controller.last_reload_ok

    # -- start and stop --

    async def start(self, hosts: Hosts | None = None) -> None:
        """Bind and serve; `hosts`: the servers' addresses as a supervisor resolved them (else looked up)."""
        loop = asyncio.get_running_loop()
        await self.controller.start(hosts)
        for warning in self.config.warnings():
            log.warning("config: %s", warning)
        opened: dict[str, logging.Handler] = {}
        try:
            serving = self.config.listeners if self.serve else ()
            built = {
                listener.name: self._make_listener(loop, listener, self.config, self.pools, opened)
                for listener in serving
            }
            self._install_access_logs(serving, opened)
            opened = {}  # the runtime's handlers now: stop() closes them
            for listener in serving:
                await self._bind(loop, listener, *built[listener.name])
            if self.manage and self.config.admin is not None:
                await self._serve_admin(self.config.admin.bind.host, self.config.admin.bind.port)
            if self.manage and self.config.cluster is not None:  # the control plane's node joins the fleet
                self.cluster = Cluster(self.config.cluster, self._listener_names(), config_hash(self.config.path))
                self.cluster.on_admin = self._fleet_action
                self.cluster.view = self._health_view
                self.cluster.on_servers = self._fleet_servers
                self.cluster.start()
        except BaseException:
            for handler in opened.values():
                handler.close()
            await self.stop()
            raise
        self._bound_all = True
        self._ticker = loop.create_task(self._tick(loop))

    def _listener_names(self) -> list[str]:
        return [f"{listener.name} {listener.bind}" for listener in self.config.listeners]

    async def share(self, pool: str, server: str, action: str, percent: int | None = None) -> bool:
        """Write an admin action for the whole fleet (False: no cluster block, this node alone);
        raises EtcdError when etcd cannot take it."""
        if self.cluster is None:
            return False
        await self.cluster.publish(pool, server, action, percent)
        return True

    def _fleet_action(self, pool: str, server: str, fields: dict[str, Any]) -> None:
        """An admin action from etcd: applied as an API call is, unless the server is already there."""
        action = fields.get("action")
        try:
            found = self.server(pool, server)
        except KeyError:
            log.info("cluster: %s for %s/%s, which this node's config does not have: ignored", action, pool, server)
            return
        wanted = {"drain": AdminState.DRAINING, "disable": AdminState.DISABLED, "enable": AdminState.ENABLED}
        if action in wanted and found.admin is not wanted[action]:
            getattr(self, action)(found)
        percent = fields.get("percent")
        if action == "weight" and isinstance(percent, int) and 0 <= percent <= 100 and found.reported != percent:
            self.set_weight(found, percent)

    def _health_view(self) -> dict[str, bool]:
        """This node's view of its servers' health ("pool/server" -> up), for the fleet: from the
        controller's snapshot, as the workers follow it."""
        return {key: state.up for key, state in self.controller.snapshot().servers.items()}

    # -- servers added or removed at run time (lbproxy.server_changes) --

    async def change_server(self, pool: str, name: str, server: ServerConfig | None, local: bool) -> bool:
        """Add `server` to `pool` as `name`, or remove `name` (None), and wait until it is in force here;
        True when written for the whole fleet, False for this node only (`local`, or no cluster block).

        Raises server_changes.Refused (refused before anything is written), OSError (the address does
        not resolve), EtcdError or TimeoutError (etcd could not take it: applied nowhere), or StartError
        (this node's reload refused it: the message says why).
        """
        base = self.controller.base
        wanted = self.controller.wanted
        server_changes.refusal(base, wanted, pool, name, server)
        if server is not None:
            await asyncio.get_running_loop().run_in_executor(None, resolve, server.address)
        fleet = not local and self.cluster is not None
        if self.cluster is not None and fleet:
            # On etcd: a removal of a file's server, or an addition the file lacks; else the key goes.
            keep = (server_changes.defined(base, pool, name) is None) is (server is not None)
            await self.cluster.publish_server(pool, name, server, keep)  # on_servers has been called
        else:
            self.local_servers[pool, name] = server
            self._want_servers()
        before = self._server_keys()
        problems = await self.controller.reload(self._prepare, reread=False)
        self._reloaded(problems, before)
        if problems:
            raise StartError("; ".join(problems))
        return fleet

    def _fleet_servers(self, changes: Changes) -> None:
        """The fleet's run-time servers, from etcd: applied at once, by a reload that does not re-read
        the file (one at a time; those that find the changes in force already do nothing)."""
        self.fleet_servers = changes
        self._want_servers()
        task = asyncio.get_running_loop().create_task(self._apply_servers())
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _apply_servers(self) -> list[str]:
        before = self._server_keys()
        problems = await self.controller.reload(self._prepare, reread=False)
        self._reloaded(problems, before)
        return problems

    def _want_servers(self) -> None:
        self.controller.want({**self.fleet_servers, **self.local_servers})

    def server_changes(self) -> dict[str, Any]:
        """The servers changed at run time, as the API shows them: by "pool/server", the definition
        added or "removed", and whose change it is (the fleet's, or this node's only)."""
        shown: dict[str, Any] = {}
        for layer, changes in (("fleet", self.fleet_servers), ("this node", self.local_servers)):
            for (pool, name), server in sorted(changes.items()):
                change = "removed" if server is None else server_fields(server)
                shown[f"{pool}/{name}"] = {"change": change, "by": layer}
        return shown

    def cluster_state(self) -> dict[str, Any] | None:
        """The fleet this node sees (`GET /api/v1/cluster`); None without a `cluster` block."""
        return self.cluster.state() if self.cluster is not None else None

    @property
    def ready(self) -> bool:
        """Listeners bound and every server probed once (the admin's /readyz)."""
        # Once ready, a reload's new probes do not make it unready again; shutting down does.
        self._was_ready = self._was_ready or (self._bound_all and self.health.probed_all())
        return self._was_ready and self.workers_ready and not self.shutting_down

    workers_ready = True  # the supervisor lowers it until every worker has bound its listeners

    async def refresh(self) -> None:
        """Bring things up to date before the admin side reads them or answers: the state file written
        (so an admin action is on disk when the API says it is done), counters summed over workers."""
        await self.controller.state_file.flush()
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
        """Close everything now (the state file is written first)."""
        self._stopped = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.cluster is not None:
            await self.cluster.stop()
            self.cluster = None
        for task in list(self._applying):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        await self.controller.stop()
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

    async def reload(self, new: Config | None = None, hosts: Hosts | None = None) -> list[str]:
        """Re-read the config file and apply it in place; returns the problems (empty: success). A worker
        is given `new` and `hosts` by its supervisor instead (see `Controller.reload`).

        Through the controller (`Controller.reload`): one reload at a time, the new state built beside
        the live one and committed in one step, so an invalid file, a name that does not resolve or a
        listener that cannot be bound changes nothing. Listeners added are bound, removed ones closed
        (their open connections finish), changed ones updated; servers that stay keep health, admin
        state and counters; in-flight requests are not interrupted.
        """
        before = self._server_keys()
        problems = await self.controller.reload(self._prepare, new, hosts)
        self._reloaded(problems, before)
        return problems

    def _server_keys(self) -> set[str]:
        return {f"{pool.name}/{server.name}" for pool in self.pools.values() for server in pool.servers}

    def _reloaded(self, problems: list[str], before: set[str]) -> None:
        """After a reload: the fleet sees this node's new config, and its servers new to it get the
        fleet's admin state and weight."""
        if not problems and self.cluster is not None:
            added = self._server_keys() - before
            self.cluster.reloaded(self._listener_names(), config_hash(self.config.path), added)

    async def _prepare(self, new: Config, pools: Mapping[str, Pool], hosts: Hosts) -> Stage:
        """The controller's `Prepare`: the listeners' stage, then the `stage_hook`'s (with --workers)."""
        for warning in new.warnings():
            log.warning("reload: %s", warning)
        listeners = await self._stage_listeners(new, pools)
        if self.stage_hook is None:
            return listeners
        try:
            other = await self.stage_hook(new, pools, hosts)
        except BaseException:
            listeners.abandon()
            raise
        return _Stages(listeners, other)

    async def _stage_listeners(self, new: Config, pools: Mapping[str, Pool]) -> _ListenerStage:
        """The listeners of `new`, on `pools` (built beside the live ones), with their new sockets bound
        but not accepting: the live listeners and loggers are not touched. Raises StartError with
        nothing left open. The controller's `Prepare`."""
        loop = asyncio.get_running_loop()
        serving = {listener.name: listener for listener in (self.config.listeners if self.serve else ())}
        wanted = {listener.name: listener for listener in (new.listeners if self.serve else ())}
        rebind = [
            listener
            for name, listener in wanted.items()
            if name not in serving or _socket_changed(serving[name], listener)
        ]
        opened: dict[str, logging.Handler] = {}
        built: dict[str, tuple[Listener, ListenerContexts | None]] = {}
        fresh: dict[str, asyncio.Server] = {}
        try:
            for listener in wanted.values():
                built[listener.name] = self._make_listener(loop, listener, new, pools, opened)
            # Bind the new sockets first, not accepting yet: if one cannot be bound, nothing has changed.
            for listener in rebind:
                old = serving.get(listener.name)
                if old is not None and old.bind == listener.bind:
                    continue  # same address, other mode or TLS: rebound after the old socket closes
                made, context = built[listener.name]
                fresh[listener.name] = await self._create_server(loop, listener, made, context, serving=False)
        except BaseException:
            for server in fresh.values():
                server.close()
            for handler in opened.values():
                handler.close()
            raise
        return _ListenerStage(self, wanted, rebind, built, fresh, opened)

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
        self,
        loop: asyncio.AbstractEventLoop,
        config: ListenerConfig,
        whole: Config,
        pools: Mapping[str, Pool],
        opened: dict[str, logging.Handler],
    ) -> tuple[Listener, ListenerContexts | None]:
        """A listener object for `config` (of the config `whole`), on the runtime pools `pools`; an access
        log it needs and the runtime has not opened yet is opened into `opened`, for
        `_install_access_logs` to attach. Touches nothing live: a reload builds beside the live state."""
        # A redirect_https listener has no pool: it answers every request itself. Its listener object
        # is given the first pool, which it never sends anything to.
        pool_config = whole.pools[config.pool] if config.pool else next(iter(whole.pools.values()))
        pool = pools[pool_config.name]
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
        maintenance = None
        if config.maintenance_page is not None:
            try:
                maintenance = config.maintenance_page.read_bytes()
            except OSError as error:
                raise StartError(f"listener {config.name}: cannot read the maintenance page: {error}") from None
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
            tunnel_timeout=config.timeouts.tunnel,
            connect_timeout=pool_config.timeouts.connect,
            response_timeout=pool_config.timeouts.response,
            max_header_size=config.limits.header_size,
            max_header_count=config.limits.header_count,
            max_target=config.limits.target_size,
            max_body=config.limits.max_body_size,
            max_idle=pool_config.keepalive.max_idle,
            idle_timeout=pool_config.keepalive.idle_timeout,
            access_log=self._access_logger(config, opened),
            accept_proxy=config.accept_proxy,
            routes=_route_table(config, pools),
            redirect_https=config.redirect_https,
            client_certificates=config.tls is not None and config.tls.client_ca is not None,
            certificates=expiries(config.tls.certificates) if config.tls is not None else (),
            rate_limit=_rate_limit(config),
            trusted=TrustedProxies(config.trusted_proxies) if config.trusted_proxies else None,
        )
        context = None
        if config.tls is not None:
            settings = config.tls
            try:
                context = ListenerContexts(settings)
            except (OSError, ssl.SSLError, TlsError) as error:
                raise StartError(f"listener {config.name}: cannot load the TLS certificates: {error}") from None
        return listener, context

    async def _create_server(
        self,
        loop: asyncio.AbstractEventLoop,
        config: ListenerConfig,
        listener: Listener,
        context: ListenerContexts | None,
        serving: bool = True,
    ) -> asyncio.Server:
        """A socket bound for `listener`; with `serving` False it accepts nothing until `start_serving()`
        (a reload binds first and accepts only once committed)."""
        factory: Callable[[], asyncio.BaseProtocol] = listener
        if context is not None:  # lbproxy runs each handshake itself, to count it (handshake.py)
            assert isinstance(listener, HttpListener)
            factory = Acceptor(listener, context)
        try:
            return await loop.create_server(
                factory,
                config.bind.host or None,
                config.bind.port,
                reuse_address=True,
                reuse_port=not self.manage,  # workers share each listening port (SO_REUSEPORT)
                backlog=1024,
                start_serving=serving,
            )
        except OSError as error:
            raise StartError(f"listener {config.name}: cannot bind {config.bind}: {error.strerror}") from None

    async def _bind(
        self,
        loop: asyncio.AbstractEventLoop,
        config: ListenerConfig,
        listener: Listener,
        context: ListenerContexts | None,
    ) -> None:
        self._adopt(config, listener, await self._create_server(loop, config, listener, context), context)

    def _adopt(
        self,
        config: ListenerConfig,
        listener: Listener,
        server: asyncio.Server,
        context: ListenerContexts | None = None,
    ) -> None:
        self._sockets[config.name] = server
        if context is not None:
            self._contexts[config.name] = context
        self.listeners[config.name] = listener
        sockname = server.sockets[0].getsockname()
        scheme = "tcp" if config.mode == "tcp" else "https" if config.tls is not None else "http"
        self.bound[config.name] = Bound(config.name, str(sockname[0]), int(sockname[1]), scheme)
        where = (
            f"pool {config.pool}"
            if config.redirect_https is None
            else f"redirect to https port {config.redirect_https}"
        )
        log.info("listener %s: %s on %s:%d, %s", config.name, scheme, sockname[0], sockname[1], where)

    def _access_logger(self, config: ListenerConfig, opened: dict[str, logging.Handler]) -> logging.Logger | None:
        """The logger of a listener's access log; a handler not open yet is opened into `opened` (not
        attached: `_install_access_logs` does that, at start or at a reload's commit)."""
        if config.access_log is None:
            return None
        logger = logging.getLogger(f"lbproxy.access.{config.name}")
        key = f"{config.name}:{config.access_log}"
        if key in self._log_handlers or key in opened:
            return logger  # a reload that keeps the same log keeps its handler
        handler: logging.Handler
        if config.access_log == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            try:
                handler = logging.FileHandler(config.access_log, encoding="utf-8")
            except OSError as error:
                raise StartError(f"listener {config.name}: cannot open the access log: {error}") from None
        handler.setFormatter(logging.Formatter("%(message)s"))
        opened[key] = handler
        return logger

    def _install_access_logs(self, listeners: Iterable[ListenerConfig], opened: dict[str, logging.Handler]) -> None:
        """Attach to each listener's access logger its one handler (kept from before, or just opened)."""
        self._log_handlers.update(opened)
        for config in listeners:
            if config.access_log is None:
                continue
            handler = self._log_handlers[f"{config.name}:{config.access_log}"]
            logger = logging.getLogger(f"lbproxy.access.{config.name}")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            for other in logger.handlers[:]:
                if other is not handler:
                    logger.removeHandler(other)
            if handler not in logger.handlers:
                logger.addHandler(handler)

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

    # Each admin action is one step of the controller (control.Controller): applied to the live pool of
    # the server, saved to the state file, a new version; never interleaved with a reload's commit.

    def drain(self, server: Server) -> None:
        """No new requests or connections; what is in flight finishes."""
        self.controller.drain(server)

    def disable(self, server: Server) -> None:
        """As drain, then whatever is still in flight after the pool's disable_grace is cut."""
        self.controller.disable(server)

    def enable(self, server: Server) -> None:
        self.controller.enable(server)

    def set_weight(self, server: Server, percent: int) -> None:
        """The live weight as `percent` of the server's ratio (see `Controller.set_weight`)."""
        self.controller.set_weight(server, percent)

    def _cut(self, server: Server) -> None:
        """A disabled server's grace is over (the controller's timer): cut what still goes to it."""
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


class _ListenerStage:
    """The listener side of a reload, built beside the live one (a `control.Stage`): listener objects on
    the new pools, new sockets bound but not accepting, access logs opened but not attached."""

    def __init__(
        self,
        runtime: Runtime,
        wanted: Mapping[str, ListenerConfig],
        rebind: list[ListenerConfig],
        built: Mapping[str, tuple[Listener, ListenerContexts | None]],
        fresh: Mapping[str, asyncio.Server],
        opened: dict[str, logging.Handler],
    ) -> None:
        self.runtime = runtime
        self.wanted = wanted
        self.rebind = rebind
        self.built = built
        self.fresh = fresh
        self.opened = opened
        self.moved: list[ListenerConfig] = []  # same address, other mode or TLS: bound once the old closed

    def commit(self) -> None:
        """Part of the controller's commit step: the listeners move to the new pools, removed ones stop
        accepting, idle connections to servers gone or moved close. Nothing here awaits or fails."""
        runtime = self.runtime
        runtime._install_access_logs(self.wanted.values(), self.opened)
        for name in list(runtime.listeners):
            if name not in self.wanted or self.wanted[name] in self.rebind:
                runtime._retire(name)
        for listener in self.wanted.values():
            made, context = self.built[listener.name]
            if listener in self.rebind:
                if listener.name in self.fresh:
                    runtime._adopt(listener, made, self.fresh[listener.name], context)
                else:
                    self.moved.append(listener)
                continue
            current = runtime.listeners[listener.name]
            if listener.tls is not None and listener.name in runtime._contexts:
                settings = listener.tls
                try:  # the new set, renewed certificates too: new handshakes use it
                    runtime._contexts[listener.name].reload(settings)
                except (OSError, ssl.SSLError, TlsError) as error:
                    log.error("reload: listener %s keeps its old certificate: %s", listener.name, error)
            if isinstance(current, HttpListener) and isinstance(made, HttpListener):
                current.reconfigure(made)
            elif isinstance(current, TcpListener) and isinstance(made, TcpListener):
                current.reconfigure(made)  # the same call, typed for each listener class
        servers = {server for pool in runtime.pools.values() for server in pool.servers}
        for listener_object in runtime._all_listeners():
            if isinstance(listener_object, HttpListener):
                listener_object.forget_servers(servers)

    def abandon(self) -> None:
        for server in self.fresh.values():
            server.close()
        for handler in self.opened.values():
            handler.close()

    async def settle(self) -> None:
        """Accept on the new sockets; bind the listeners whose old socket held their address."""
        runtime = self.runtime
        for server in self.fresh.values():
            if not runtime._stopped:
                await server.start_serving()
        loop = asyncio.get_running_loop()
        for listener in self.moved:
            if runtime._stopped:
                return
            made, context = self.built[listener.name]
            try:
                await runtime._bind(loop, listener, made, context)
            except StartError as error:
                log.error("reload: listener %s is not listening any more: %s", listener.name, error)


class _Stages:
    """Two stages of one reload, committed, abandoned and settled in order (a `control.Stage`)."""

    def __init__(self, first: Stage, second: Stage) -> None:
        self.first = first
        self.second = second

    def commit(self) -> None:
        self.first.commit()
        self.second.commit()

    def abandon(self) -> None:
        self.first.abandon()
        self.second.abandon()

    async def settle(self) -> None:
        await self.first.settle()
        await self.second.settle()


def _socket_changed(old: ListenerConfig, new: ListenerConfig) -> bool:
    """Whether a listener needs a new socket (its address or mode changed, or TLS turned on or off;
    a new set of certificates is loaded in place)."""
    return old.bind != new.bind or old.mode != new.mode or _tls_kind(old) != _tls_kind(new)


def _tls_kind(config: ListenerConfig) -> tuple[bool, bool]:
    """(TLS, mutual TLS): what a socket's context is made with; a change of anything else is loaded in place."""
    return (config.tls is not None, config.tls is not None and config.tls.client_ca is not None)


def _rate_limit(config: ListenerConfig) -> RateLimit | None:
    """The listener's rate limit, a fresh set of buckets (a reload carries the old ones over)."""
    settings = config.rate_limit
    if settings is None:
        return None
    header = settings.header.lower().encode() if settings.header is not None else None
    return RateLimit(RateLimiter(settings.rate, settings.burst, settings.max_clients), header, settings.status)


def _route_table(config: ListenerConfig, pools: Mapping[str, Pool]) -> RouteTable | None:
    """The listener's routes compiled, each aimed at its runtime pool; None without routes."""
    if not config.routes:
        return None
    table = RouteTable(config.routes)
    for route in table.routes:
        if route.pool_name is not None:
            route.target = pools[route.pool_name]
    return table
