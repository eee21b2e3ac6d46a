"""A fleet of lbproxy nodes on etcd: this node in it, the nodes it sees, and what they all apply.

With a `cluster` block, the node that runs the control plane (the only process, or the supervisor of
`--workers`) registers itself under `<prefix>nodes/<node>` with a lease: its name, version,
listeners, the hash of its config file and its start time, renewed every third of the lease's
life. It reads every node's registration (a snapshot, then a watch from the snapshot's revision,
so that no change is missed and none is applied twice), and drops a node whose lease expired
(etcd deletes its key). `GET /api/v1/cluster` and `lbproxy ctl cluster` show the fleet and flag a
node whose config differs from the most common one.

When etcd cannot be reached, the node keeps serving as it is and says so (`connected` false, a log
line, `lbproxy_cluster_connected 0`); it retries every second, and on its return registers again and
reads a new snapshot. Nothing here is on the request path: it all runs as one task on the loop.

**One admin action, every node.** Drain, disable, enable and live weights received by any node (its
API, or `lbproxy ctl` against it) are written to etcd under `<prefix>admin/<pool>/<server>` and
`<prefix>weight/<pool>/<server>` (`publish`), and
every node applies them from its watch (`on_admin`, the same path as an API call on one node); a
snapshot at each (re)connection applies what changed while it was away. etcd unreachable: the write
is refused (applied nowhere), unless the caller asks for this node only.

**Servers added or removed at run time, every node.** `publish_server` writes `<prefix>servers/<pool>/<server>`:
the server's definition, or `{"removed": true}` for a server the file has (a removal of a server the
file lacks deletes the key, so that nothing stale waits for a file that adds that name one day).
Every node hands the whole set to `on_servers` at each change (the runtime applies it on top of its
file, lbproxy.server_changes); the node that took the call waits until its own watch has seen the
write, so that its answer means applied here too.

**Health views are shared, decisions stay local.** Each node keeps probing on its own and routes by
what it sees; it publishes its view (`<prefix>health/<node>`, under its lease) when it changes, and
`disagreements` says which servers the nodes do not see alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from lbproxy import __version__, build, tls
from lbproxy.config import ClusterConfig, ServerConfig, server_fields, server_from
from lbproxy.etcd import Etcd, EtcdError
from lbproxy.server_changes import Changes

log = logging.getLogger("lbproxy.cluster")

LEASE: int = 10  # seconds a node's registration outlives its last renewal
RETRY: float = 1.0  # seconds between attempts while etcd cannot be reached
VIEW_EVERY: float = 0.5  # seconds between looks at this node's health view (published when it changed)
CATCH_UP: float = 5.0  # seconds a node that wrote a change waits for its own watch to see it


class Cluster:
    """This node in the fleet: its registration, the fleet as etcd says, and whether etcd answers."""

    def __init__(self, settings: ClusterConfig, listeners: list[str], config_hash: str) -> None:
        self.settings = settings
        self.node = settings.node
        self.listeners = listeners
        self.config_hash = config_hash
        self.started = time.time()
        self.connected = False
        self.since = time.time()  # when `connected` last changed
        self.error = ""  # why etcd could not be reached, while it cannot
        self.nodes: dict[str, dict[str, Any]] = {}  # node name -> its registration, as etcd has it
        # Applies an admin action that etcd holds (pool, server, its fields), as an API call does on one node
        self.on_admin: Callable[[str, str, dict[str, Any]], None] | None = None
        # This node's health view, "pool/server" -> up: published for the others, never applied by them
        self.view: Callable[[], dict[str, bool]] | None = None
        self.views: dict[str, dict[str, bool]] = {}  # node -> its published view
        self.held: dict[str, bytes] = {}  # "admin/<pool>/<server>", "weight/...": what etcd holds
        self.servers: dict[tuple[str, str], ServerConfig | None] = {}  # the fleet's run-time servers, None: removed
        # Applies the fleet's run-time servers (all of them, at each change), as the API does on one node
        self.on_servers: Callable[[Changes], None] | None = None
        self.revision = 0  # etcd's revision this node has seen everything up to
        self.renewals = 0  # of its registration's lease, since it started
        self._moved = asyncio.Event()  # set when `revision` moves
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._etcd: Etcd | None = None
        self._lease = 0

    @property
    def key(self) -> str:
        return f"{self.settings.prefix}nodes/{self.node}"

    def start(self) -> None:
        settings = self.settings
        # https endpoints: the CA and client certificate of cluster.etcd.tls, else the system's CAs
        context = tls.upstream_context(settings.tls) if settings.tls is not None else None
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context or True))
        credentials = (settings.username, settings.password) if settings.username and settings.password else None
        self._etcd = Etcd(settings.endpoints, self._session, credentials)
        self._task = asyncio.get_running_loop().create_task(self._run(self._etcd))

    async def stop(self) -> None:
        """Leave the fleet: the registration's lease is revoked (the others see it go at once)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            if self._lease and self._etcd is not None:
                with contextlib.suppress(EtcdError):
                    await self._etcd.revoke(self._lease)
            await self._session.close()
            self._session = None
            self._etcd = None

    def reloaded(self, listeners: list[str], config_hash: str, added: set[str]) -> None:
        """A reload was applied: what this node says of itself is written at the next renewal, and the
        servers it `added` ("pool/server") get what etcd holds for them (a server the file brings back
        gets the fleet's admin state and weight). Servers that stayed kept theirs, a `--local` one
        included."""
        self.listeners = listeners
        self.config_hash = config_hash
        for where, value in list(self.held.items()):
            if where.partition("/")[2] in added:
                self._apply(where.partition("/")[2], value)

    def registration(self) -> bytes:
        return json.dumps(
            {
                "node": self.node,
                "version": __version__,
                "build": build.RUNNING,
                "listeners": self.listeners,
                "config_hash": self.config_hash,
                "started": self.started,
            }
        ).encode()

    async def _run(self, etcd: Etcd) -> None:
        while True:
            try:
                await self._serve(etcd)
            except EtcdError as error:
                self._disconnected(str(error))
            await asyncio.sleep(RETRY)

    async def _serve(self, etcd: Etcd) -> None:
        """Register, read the fleet, then follow it until etcd fails (EtcdError)."""
        self._lease = await etcd.grant(LEASE)
        await etcd.put(self.key, self.registration(), self._lease)
        prefix = self.settings.prefix
        # One consistent snapshot of everything under the prefix, then one watch from its revision:
        # no change is missed, none applied twice; what changed while away is applied now.
        revision, found = await etcd.get_prefix(prefix)
        # What was deleted while away is gone; an admin state or weight is applied only if it changed
        # meanwhile (`_changed`), so that a `--local` action taken while etcd was away stays.
        self.nodes, self.views, self.servers = {}, {}, {}
        self.held = {where: value for where, value in self.held.items() if prefix + where in found}
        for key, value in found.items():
            self._changed(key[len(prefix) :], value, batch=True)
        self._servers_changed()
        self._seen(revision)
        self._connected()
        loop = asyncio.get_running_loop()
        tasks = {
            loop.create_task(self._renew(etcd)),
            loop.create_task(self._follow(etcd, prefix, revision + 1)),
            loop.create_task(self._publish_view(etcd)),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # its EtcdError ends this round
        finally:
            for task in tasks:
                task.cancel()
            # Wait for their ends without taking their exceptions: a cancellation of this task (a stop)
            # must go on up, not be swallowed with theirs (it was: a node stopped as etcd went away
            # kept retrying etcd for ever).
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()  # seen: the one that ended the round was raised above

    async def _follow(self, etcd: Etcd, prefix: str, revision: int) -> None:
        async for event in etcd.watch(prefix, revision):
            self._changed(event.key[len(prefix) :], event.value)
            self._seen(event.revision)

    def _seen(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._moved.set()
            self._moved.clear()  # the waiters woken keep running: set() has scheduled them

    async def _caught_up(self, revision: int) -> None:
        while self.revision < revision:
            await self._moved.wait()

    def _changed(self, where: str, value: bytes | None, batch: bool = False) -> None:
        """One key under the prefix, as read or as changed (None: deleted): `nodes/<node>`,
        `health/<node>`, or what every node applies: `admin/<pool>/<server>`, `weight/<pool>/<server>`
        and `servers/<pool>/<server>` (`batch`: part of a snapshot, the servers handed over after it)."""
        kind, _, rest = where.partition("/")
        if kind == "nodes":
            if value is None:
                self.nodes.pop(rest, None)
            else:
                self.nodes[rest] = _parsed(value)
        elif kind == "health":
            if value is None:
                self.views.pop(rest, None)
            else:
                view = _parsed(value)
                self.views[rest] = {key: up for key, up in view.items() if isinstance(up, bool)}
        elif kind in ("admin", "weight"):
            if value is None:
                self.held.pop(where, None)
                return
            if self.held.get(where) != value:  # each write differs (its time): unchanged means seen already
                self.held[where] = value
                self._apply(rest, value)
        elif kind == "servers":
            pool, _, name = rest.partition("/")
            self.servers.pop((pool, name), None)
            if value is not None:
                self._server_entry(pool, name, _parsed(value))
            if not batch:
                self._servers_changed()

    def _server_entry(self, pool: str, name: str, fields: dict[str, Any]) -> None:
        if fields.get("removed") is True:
            self.servers[pool, name] = None
            return
        definition = fields.get("server")
        try:
            if not isinstance(definition, dict) or definition.get("name") != name:
                raise ValueError("not a server definition under its name")
            self.servers[pool, name] = server_from(definition)
        except ValueError as error:  # written by something else than lbproxy: ignored, said
            log.error("cluster: %sservers/%s/%s ignored: %s", self.settings.prefix, pool, name, error)

    def _servers_changed(self) -> None:
        if self.on_servers is not None:
            self.on_servers(dict(self.servers))

    def _apply(self, where: str, value: bytes) -> None:
        if self.on_admin is not None:
            pool, _, server = where.partition("/")
            self.on_admin(pool, server, _parsed(value))

    async def publish(self, pool: str, server: str, action: str, percent: int | None = None) -> None:
        """Write an admin action (drain, disable, enable, or weight with `percent`) for every node,
        this one included, to apply; raises EtcdError when etcd cannot take it, so that it is applied
        nowhere rather than on one node only."""
        etcd = self._etcd
        if etcd is None or not self.connected:
            raise EtcdError(self.error or "not connected to etcd")
        fields: dict[str, Any] = {"action": action, "by": self.node, "at": time.time()}
        kind = "admin"
        if action == "weight":
            fields["percent"] = percent
            kind = "weight"  # beside the admin state: a drain does not undo a weight, nor the reverse
        where = f"{kind}/{pool}/{server}"
        value = json.dumps(fields).encode()
        await etcd.put(self.settings.prefix + where, value)
        # Held at once, as the caller applies it at once: a reload before the watch brings it back (a
        # server the file drops and adds again) gets it too, and the echo, the same bytes, is not
        # applied a second time.
        self.held[where] = value

    async def publish_server(self, pool: str, name: str, server: ServerConfig | None, keep: bool) -> None:
        """Write a server added (its definition) or removed (None) for every node, this one included, and
        wait until this node's watch has seen it (its `on_servers` has been called). `keep` False: the
        change undoes what etcd holds for that name (the key is deleted). Raises EtcdError when etcd
        cannot take it, TimeoutError when the watch lags."""
        etcd = self._etcd
        if etcd is None or not self.connected:
            raise EtcdError(self.error or "not connected to etcd")
        key = f"{self.settings.prefix}servers/{pool}/{name}"
        if not keep:
            revision = await etcd.delete(key)
        else:
            fields: dict[str, Any] = {"by": self.node, "at": time.time()}
            if server is None:
                fields["removed"] = True
            else:
                fields["server"] = server_fields(server)
            revision = await etcd.put(key, json.dumps(fields).encode())
        await asyncio.wait_for(self._caught_up(revision), CATCH_UP)

    async def _publish_view(self, etcd: Etcd) -> None:
        """Publish this node's view of its servers' health whenever it changes (checked twice a
        second), under its lease: it goes with the node."""
        written: dict[str, bool] | None = None
        while True:
            view = self.view() if self.view is not None else {}
            if view != written:
                await etcd.put(f"{self.settings.prefix}health/{self.node}", json.dumps(view).encode(), self._lease)
                written = view
            await asyncio.sleep(VIEW_EVERY)

    def disagreements(self) -> dict[str, dict[str, list[str]]]:
        """The servers the nodes do not see alike: "pool/server" -> {"up": [nodes], "down": [nodes]}.
        Down on one node only is a network path between that node and the server, not a broken server."""
        found: dict[str, dict[str, list[str]]] = {}
        servers = {key for view in self.views.values() for key in view}
        for key in sorted(servers):
            seen: dict[str, list[str]] = {"up": [], "down": []}
            for node, view in sorted(self.views.items()):
                if key in view:
                    seen["up" if view[key] else "down"].append(node)
            if seen["up"] and seen["down"]:
                found[key] = seen
        return found

    async def _renew(self, etcd: Etcd) -> None:
        written = self.registration()
        while True:
            await asyncio.sleep(LEASE / 3)
            if not await etcd.keep_alive(self._lease):
                raise EtcdError("the registration's lease expired")
            self.renewals += 1
            if self.registration() != written:  # a reload changed it
                written = self.registration()
                await etcd.put(self.key, written, self._lease)

    def _connected(self) -> None:
        if not self.connected:
            log.warning("cluster: node %s connected to etcd: %d nodes in the fleet", self.node, len(self.nodes))
            self.connected = True
            self.since = time.time()
            self.error = ""

    def _disconnected(self, why: str) -> None:
        if self.connected or not self.error:
            log.error("cluster: node %s cannot reach etcd, serving with what it has: %s", self.node, why)
            self.connected = False
            self.since = time.time()
        self.error = why

    def state(self) -> dict[str, Any]:
        """The fleet as the API and `ctl cluster` show it."""
        hashes = Counter(node.get("config_hash") for node in self.nodes.values())
        common = hashes.most_common(1)[0][0] if hashes else None
        return {
            "node": self.node,
            "connected": self.connected,
            "since": self.since,
            "error": self.error or None,
            "disagreements": self.disagreements(),
            "servers": {
                f"{pool}/{name}": "removed" if server is None else server_fields(server)
                for (pool, name), server in sorted(self.servers.items())
            },
            "nodes": [
                {
                    **node,
                    "self": name == self.node,
                    "config_differs": node.get("config_hash") != common,
                }
                for name, node in sorted(self.nodes.items())
            ],
        }


def _parsed(value: bytes) -> dict[str, Any]:
    try:
        found = json.loads(value)
    except ValueError:
        return {"error": "not a registration"}
    return found if isinstance(found, dict) else {"error": "not a registration"}


def config_hash(path: Path) -> str:
    """A short hash of a config file's bytes: two nodes with the same file have the same one."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""
