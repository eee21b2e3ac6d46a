"""The control plane's one owner: reloads, admin actions, and the versioned state they leave.

`Controller` holds the live pools (and through them every server's health, admin state and live
weight), the probe loops that watch them, the state file, and a version number. Its rule: every change
of the live state is applied in one synchronous step of the event loop, so that no two interleave.

- An admin action (drain, disable, enable, weight) is one step: applied through the server's pool,
  saved to the state file, version + 1.
- A health event is one step of a probe loop or of passive detection, through the pool's methods
  (`Pool.set_health`, `Pool.set_weight`); the controller only decides which probe loops run.
- A reload is built beside the live state, then committed in one step. While it is built (the file
  read and checked, names resolved, pools and listeners made, new sockets bound but not accepting),
  nothing live is touched and admin actions and health events go on applying to the live state. The
  commit hands the servers that stay over to the new pools as they are at that instant, moves the
  listeners to them, replaces the probe loops and bumps the version. A reload refused before its
  commit has changed nothing. A reload holds a lock across its awaits: reloads run one after another.
- Servers added or removed at run time (the admin API, or the fleet's etcd) are a reload that does not
  re-read the file: the file as last loaded (`base`) with the changes wanted (`want`) on top
  (lbproxy.server_changes). Every reload applies the changes in force, so a file reload keeps them.

`snapshot()` is the applied state with its version: what the workers of `--workers N` (and later the
cluster) are to follow. This module must not touch a socket or a protocol; the listener side of a
reload is the runtime's, handed in as a `Stage` and committed in the same step.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lbproxy import config, server_changes
from lbproxy.config import Config
from lbproxy.health import HealthChecks
from lbproxy.pool import AdminState, Pool, Server
from lbproxy.server_changes import Changes

log = logging.getLogger("lbproxy.control")

STATE_FILE_FORMAT = 1  # the "version" written in the state file: its format, not the controller's version


class StartError(Exception):
    """The runtime could not be built or bound, at start or on a reload; the message says what and where."""


class Phase(enum.Enum):
    """Where the controller is in a reload. The commit is not a phase: it is one synchronous step
    between BUILDING and SETTLING, which nothing else can observe half done."""

    IDLE = "idle"  # no reload under way
    LOADING = "loading"  # reading and checking the new file (in a thread)
    BUILDING = "building"  # resolving names; pools and listeners built beside the live ones; new sockets bound
    SETTLING = "settling"  # committed: new sockets start accepting, moved ones rebind, the old probe loops end


class Stage(Protocol):
    """What the runtime builds beside a reload (its listeners and their sockets)."""

    def commit(self) -> None:
        """Install it; called in the controller's commit step, so it must not await or fail."""

    def abandon(self) -> None:
        """The reload is refused after all (lbproxy is stopping): close what was opened for it."""

    async def settle(self) -> None:
        """What follows the commit: accept on the new sockets, rebind a listener whose old socket held its
        address. The new state is live already; a failure here is logged, not refused."""


# Where each server is to be reached, by (pool, server): its name as `config.resolve` looked it up.
Hosts = Mapping[tuple[str, str], str]

# The runtime's part of a reload: build a `Stage` for the new config on the new pools (built beside the
# live ones; they hold their servers only from the commit), or raise StartError, leaving nothing open.
# It is also given the addresses the commit will set, which a supervisor passes on to its workers.
Prepare = Callable[[Config, Mapping[str, Pool], Hosts], Awaitable[Stage]]


@dataclass(frozen=True, slots=True)
class ServerState:
    """What the control plane decides of one server, as it is applied."""

    up: bool
    admin: AdminState
    weight: int  # the live weight, in hundredths of a ratio unit (pool.WEIGHT_SCALE)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The applied state of every live server, at `version` (see `Controller.snapshot`)."""

    version: int
    servers: Mapping[str, ServerState]  # by "pool/server"

    def as_message(self) -> dict[str, Any]:
        """As JSON values: `{"version": n, "servers": {"pool/server": [up, admin, weight]}}`."""
        return {
            "version": self.version,
            "servers": {key: [state.up, state.admin.value, state.weight] for key, state in self.servers.items()},
        }


class Controller:
    """The live pools and everything that changes them; see the module docstring.

    The runtime creates it from the config it starts with (version 1), calls `start()` once, routes the
    admin actions and reloads through it, and `stop()` at the end. `manage`: run the probes and keep the
    state file (a worker of `--workers N` follows its supervisor instead). `cut` is called when a
    disabled server's grace is over: the runtime closes what its listeners still relay to it.
    """

    def __init__(self, whole: Config, manage: bool, cut: Callable[[Server], None]) -> None:
        self.config = whole  # the config in force: the file's with the servers changed at run time
        self.base = whole  # the file's, as last loaded
        self.changes: Changes = {}  # the servers changed at run time that `config` has (server_changes)
        self.wanted: Changes = {}  # those to apply at the next reload
        self.manage = manage
        self.version = 1
        self.phase = Phase.IDLE
        self.pools = build_pools(whole, None)
        self.health = HealthChecks()
        self.state_file = StateFile(whole.state_file if manage else None)
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_ok = True
        self._cut = cut
        self._grace: dict[Server, asyncio.TimerHandle] = {}
        self._lock = asyncio.Lock()  # held by a reload from its first step to its last
        self._stopped = False

    async def start(self, hosts: Hosts | None = None) -> None:
        """Resolve the server names (or take `hosts`, a supervisor's, as they are); with `manage`, restore
        the state file and start the probe loops."""
        if hosts is None:
            hosts = await resolve_hosts(self.config)
        for pool in self.pools.values():
            for server in pool.servers:
                server.reach(hosts[pool.name, server.name])
        if self.manage:
            self._restore(await self.state_file.load())
            self.health = _checks(self.config, self.pools)
            self.health.start()

    async def stop(self) -> None:
        """Cancel the grace timers, stop the probes, and wait until the state file is written."""
        self._stopped = True
        for handle in self._grace.values():
            handle.cancel()
        self._grace.clear()
        await self.health.stop()
        await self.state_file.flush()

    # -- the applied state --

    def snapshot(self) -> Snapshot:
        """Every live server's health, admin state and live weight, with the version of the last commit.

        The version counts commits: reloads and admin actions that changed something. Health events
        and live weights (probes, passive detection, slow start) are applied by the pools between
        commits without a version of their own, so two snapshots of one version may differ there: a
        publisher sends a snapshot when it differs from the last one sent (as the supervisor's push
        loop compares states today), and a consumer may refuse one older than the version it holds.
        The snapshot is a copy: it never changes after it is taken.
        """
        return Snapshot(
            self.version,
            {
                f"{pool.name}/{server.name}": ServerState(server.up, server.admin, server.weight)
                for pool in self.pools.values()
                for server in pool.servers
            },
        )

    # -- admin actions: each one step, applied to the live pool of its server --

    def drain(self, server: Server) -> None:
        """No new requests or connections; what is in flight finishes."""
        self._cancel_grace(server)
        self._set_admin(server, AdminState.DRAINING)

    def disable(self, server: Server) -> None:
        """As drain, then whatever is still in flight after the pool's disable_grace is cut."""
        self._cancel_grace(server)
        self._set_admin(server, AdminState.DISABLED)
        loop = asyncio.get_running_loop()
        self._grace[server] = loop.call_later(server.pool.disable_grace, self._grace_over, server)

    def enable(self, server: Server) -> None:
        self._cancel_grace(server)
        self._set_admin(server, AdminState.ENABLED)

    def set_weight(self, server: Server, percent: int) -> None:
        """Set the live weight to `percent` (0-100) of the server's ratio, as an operator's override (a
        dynamic_ratio probe's next report replaces it). Not kept in the state file."""
        before = server.weight
        server.pool.set_weight(server, percent)
        if server.weight != before:
            self.version += 1

    def _set_admin(self, server: Server, state: AdminState) -> None:
        if server.admin is state:
            return
        server.pool.set_admin(server, state)
        self.version += 1
        self._save()

    def _cancel_grace(self, server: Server) -> None:
        handle = self._grace.pop(server, None)
        if handle is not None:
            handle.cancel()

    def _grace_over(self, server: Server) -> None:
        self._grace.pop(server, None)
        self._cut(server)

    # -- reload --

    def want(self, changes: Changes) -> None:
        """The servers changed at run time (both layers, see server_changes) from now on: applied by the
        next reload, which `reload(prepare, reread=False)` makes at once."""
        self.wanted = dict(changes)

    async def reload(
        self, prepare: Prepare, new: Config | None = None, hosts: Hosts | None = None, reread: bool = True
    ) -> list[str]:
        """Re-read the config file, build the new state beside the live one, and commit it; returns the
        problems (empty: committed). One reload at a time: a second one waits for the first to end.

        The servers changed at run time (`want`) are applied on top of the file (`server_changes.apply`).
        `reread` False: the file as last loaded, with the changes wanted now: nothing to do when they are
        in force already.

        `new` and `hosts`: a config and its addresses that someone else loaded, checked and resolved (a
        worker of `--workers N` is given its supervisor's), taken as they are instead of the file and the
        name lookups.

        Refused (counted, logged, nothing changed): a file that does not load, a name that does not
        resolve, a listener that cannot be built or bound (`prepare` raises StartError), or a stop
        that came first.
        """
        async with self._lock:
            try:
                return await self._reload(prepare, new, hosts, reread)
            finally:
                self.phase = Phase.IDLE

    async def _reload(self, prepare: Prepare, new: Config | None, hosts: Hosts | None, reread: bool) -> list[str]:
        self.phase = Phase.LOADING
        base, changes = self.base, self.wanted
        if new is None:
            if reread:
                try:
                    base = await asyncio.to_thread(config.load, self.config.path)
                except config.ConfigError as error:
                    return self._refused([str(problem) for problem in error.problems])
            elif changes == self.changes:
                return []  # in force already (an earlier reload took them)
            new, notes = server_changes.apply(base, changes)
            for note in notes:
                log.warning("servers changed at run time: %s", note)
        else:
            base = new  # a worker's: the supervisor's config, changes applied; a worker never re-reads
        self.phase = Phase.BUILDING
        try:
            if hosts is None:
                hosts = await resolve_hosts(new)
            pools = build_pools(new, self.pools)  # beside the live ones: no server is touched yet
            stage = await prepare(new, pools, hosts)
        except StartError as error:
            return self._refused([str(error)])
        if self._stopped:
            stage.abandon()
            return self._refused(["lbproxy is stopping"])
        # The commit: one synchronous step, from here to `self.phase = SETTLING`.
        retired = self._commit(new, pools, hosts)
        self.base, self.changes = base, changes
        stage.commit()
        self.phase = Phase.SETTLING
        what = "reload" if reread else "servers changed at run time"
        log.info("%s: %s (version %d)", what, new.summary(), self.version)
        await stage.settle()
        await retired.stop()  # cancelled at the commit already: this only waits for their end
        return []

    def _commit(self, new: Config, pools: Mapping[str, Pool], hosts: Hosts) -> HealthChecks:
        """Install `pools` (built by `build_pools` beside the live ones); returns the old probe loops,
        cancelled, for the caller to wait on. Synchronous: nothing else runs until it returns."""
        for pool in pools.values():
            pool.take_over()
        _link(new, pools)
        for pool in pools.values():
            for server in pool.servers:
                server.reach(hosts[pool.name, server.name])
        retired = self.health
        retired.cancel()  # no verdict of an old loop lands after this step
        self.pools = dict(pools)
        self.config = new
        self.health = _checks(new, self.pools) if self.manage else HealthChecks()
        self.health.start()
        if self.manage:
            self.state_file.path = new.state_file
        self.version += 1
        self.reloads["success"] += 1
        self.last_reload_ok = True
        self._save()  # servers gone from the config leave the state file too
        return retired

    def _refused(self, problems: list[str]) -> list[str]:
        self.reloads["failure"] += 1
        self.last_reload_ok = False
        for problem in problems:
            log.error("reload refused, the running config stays: %s", problem)
        return problems

    # -- the state file --

    def _save(self) -> None:
        self.state_file.save(
            {
                f"{pool.name}/{server.name}": server.admin
                for pool in self.pools.values()
                for server in pool.servers
                if server.admin is not AdminState.ENABLED
            }
        )

    def _restore(self, states: Mapping[str, AdminState]) -> None:
        for key, state in states.items():
            pool_name, _, server_name = key.partition("/")
            pool = self.pools.get(pool_name)
            server = pool.by_name.get(server_name) if pool is not None else None
            if server is None:
                log.info("state file: %s is not in the config any more", key)
                continue
            assert pool is not None
            pool.set_admin(server, state)
            log.info("state file: pool %s: server %s starts %s", pool_name, server_name, state.value)


def build_pools(whole: Config, live: Mapping[str, Pool] | None) -> dict[str, Pool]:
    """The pools of `whole`. At start (`live` None) they are ready at once. On a reload they are built
    beside `live` and hold no server until the commit (`Pool.take_over`), which links the backup pools."""
    if live is None:
        pools = {name: Pool(pool) for name, pool in whole.pools.items()}
        _link(whole, pools)
        return pools
    return {name: Pool(pool, live.get(name), reloading=True) for name, pool in whole.pools.items()}


def _link(whole: Config, pools: Mapping[str, Pool]) -> None:
    for name, pool in whole.pools.items():
        if pool.backup_pool is not None:
            pools[name].fail_over_to(pools[pool.backup_pool])


def _checks(whole: Config, pools: Mapping[str, Pool]) -> HealthChecks:
    """One probe loop per server of `pools` (not started)."""
    checks = HealthChecks()
    for name, pool in pools.items():
        checks.add(pool, whole.pools[name].health)
    return checks


async def resolve_hosts(whole: Config) -> dict[tuple[str, str], str]:
    """The address to connect to of every server of `whole`, by (pool, server), through `config.resolve`
    (which `lbproxy check` uses too), in a thread: the system resolver blocks. Touches no live server."""
    loop = asyncio.get_running_loop()
    hosts: dict[tuple[str, str], str] = {}
    for pool in whole.pools.values():
        for server in pool.servers:
            try:
                hosts[pool.name, server.name] = await loop.run_in_executor(None, config.resolve, server.address)
            except OSError as error:
                reason = error.strerror or error
                raise StartError(
                    f"pools.{pool.name}: server {server.name}: cannot resolve {server.address.host!r}: {reason}"
                ) from None
    return hosts


class StateFile:
    """The admin state across restarts: every drained or disabled server, as JSON,
    `{"version": 1, "servers": {"pool/server": "draining" | "disabled"}}`.

    A write is atomic and durable (a temporary file, fsync, rename, fsync of the folder) and blocks, so
    it runs in a thread, never on the event loop. Writes are made one at a time and in order: a save
    made while one is being written waits for it, and saves made meanwhile fold into the latest, so the
    file always ends with the last state saved. `flush()` waits until that is on disk.

    Reading never stops lbproxy: a file that is missing, unreadable or damaged in any way is logged and
    ignored (every server starts enabled), and an entry that makes no sense is logged and skipped.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._pending: tuple[Path, str] | None = None
        self._writer: asyncio.Task[None] | None = None

    async def load(self) -> dict[str, AdminState]:
        """The admin states the file holds, by "pool/server"; {} when there is none or it is damaged."""
        path = self.path
        if path is None:
            return {}
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:  # ValueError: not UTF-8
            log.error("cannot read the state file %s, starting with every server enabled: %s", path, error)
            return {}
        try:
            return parse_state(text)
        except ValueError as error:
            log.error("cannot read the state file %s, starting with every server enabled: %s", path, error)
            return {}

    def save(self, states: Mapping[str, AdminState]) -> None:
        """Write `states` (by "pool/server"; enabled servers left out) soon, in a thread."""
        if self.path is None:
            return
        servers = {key: state.value for key, state in states.items()}
        text = json.dumps({"version": STATE_FILE_FORMAT, "servers": servers}, indent=2, sort_keys=True) + "\n"
        self._pending = (self.path, text)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending(), name="state file")

    async def flush(self) -> None:
        """Wait until the last state saved is written (or its write failed, logged)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)  # a caller cancelled must not cancel the write

    async def _write_pending(self) -> None:
        while self._pending is not None:
            path, text = self._pending
            self._pending = None
            await asyncio.to_thread(_write_atomically, path, text)


def parse_state(text: str) -> dict[str, AdminState]:
    """The admin states in the text of a state file; ValueError says what is wrong with its shape.

    Entries whose key is not "pool/server" or whose state is neither "draining" nor "disabled" are
    logged and left out; the rest still count.
    """
    document = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(document, dict):
        raise ValueError(f'expected an object with a "servers" object, got {type(document).__name__}')
    servers = document.get("servers")
    if not isinstance(servers, dict):
        raise ValueError(f'expected "servers" to be an object, got {json.dumps(servers)[:40]}')
    states: dict[str, AdminState] = {}
    for key, value in servers.items():
        if "/" not in key or value not in ("draining", "disabled"):
            log.error("state file: ignoring %s: %s (expected pool/server: draining or disabled)", key, value)
            continue
        states[key] = AdminState(value)
    return states


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text`: readers see the old file or the new one, never half of one,
    and the new one survives a power cut. Blocks: the StateFile's writer runs it in a thread."""
    temporary: str | None = None
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        temporary = None
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself
        finally:
            os.close(folder)
    except OSError as error:
        log.error("cannot write the state file %s: %s", path, error)
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass
