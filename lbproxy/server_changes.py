"""Servers added and removed at run time, on top of the config file: what they are, and the config they make.

The file is the base. A change is kept by (pool, server name): a `ServerConfig` for a server added, or
None for one removed. There are two layers of them, the fleet's (what etcd holds, the same on every
node: lbproxy.cluster) and this node's own (`?local=1`, or every change on a node without a cluster
block; in memory only, gone at a restart), this node's on top. `apply` makes the config the controller
runs from the file's and the changes, and says what it could not apply. The rules, which every node
applies alike:

- A server added under a name the file has in that pool is shadowed: the file's definition applies. A
  file edited after the change must never lose to it (HAProxy's stale state file overriding a new
  config is the long-standing complaint this avoids); the note says so at every reload.
- A server removed that the file has stays removed while the change exists, even when the file is
  edited: a server an operator took out does not come back on its own. Adding it again, as the file
  defines it, undoes the removal.
- A removal that would leave a pool with fewer primary servers than its `min_up` (one by default) is
  not applied; nor is a change for a pool the file does not have.

Plain code: no I/O. The controller calls `apply` when it builds a reload; the admin API calls
`refusal` before it writes a change anywhere, so that one refused here is refused at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from lbproxy import config
from lbproxy.config import Config, ServerConfig

# (pool, server name) -> the server added, or None: removed
Changes = Mapping[tuple[str, str], ServerConfig | None]


def apply(base: Config, changes: Changes) -> tuple[Config, list[str]]:
    """The config `base` with `changes` on top, and a note for each change it could not apply."""
    pools = dict(base.pools)
    notes: list[str] = []
    # Additions first, so that a removal is weighed against the pool it leaves, added servers included.
    for (pool_name, name), server in sorted(changes.items(), key=lambda item: (item[1] is None, item[0])):
        where = f"{pool_name}/{name}"
        pool = pools.get(pool_name)
        if pool is None:
            notes.append(f"{where}: the config has no pool {pool_name!r}: not applied")
            continue
        if server is None:
            if all(kept.name != name for kept in pool.servers):
                continue  # never there, or added and removed again
            kept = tuple(other for other in pool.servers if other.name != name)
            primaries = sum(1 for other in kept if not other.backup)
            if primaries < pool.min_up:
                notes.append(
                    f"{where}: not removed: it would leave the pool {primaries} primary servers, "
                    f"fewer than its min_up {pool.min_up}"
                )
                continue
            pools[pool_name] = dataclasses.replace(pool, servers=kept)
        elif (filed := defined(base, pool_name, name)) is not None:
            if server != filed:  # the same definition as the file's is how a removal is undone
                notes.append(f"{where}: the config file defines it: the file's definition applies, not the one added")
        else:
            pools[pool_name] = dataclasses.replace(pool, servers=(*pool.servers, server))
    return dataclasses.replace(base, pools=pools), notes


class Refused(Exception):
    """A change the admin API refuses before writing it anywhere; `missing`: the pool or server is unknown
    (404), else it conflicts with what is there (409)."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def refusal(base: Config, changes: Changes, pool: str, name: str, server: ServerConfig | None) -> None:
    """Raise `Refused` unless adding `server` as `pool/name` (None: removing it) would apply on top of
    `changes` to `base`, the file."""
    running, _ = apply(base, changes)
    current = running.pools.get(pool)
    if current is None:
        raise Refused(f"no pool named {pool!r}", missing=True)
    present = any(other.name == name for other in current.servers)
    if server is not None and present:
        raise Refused(f"pool {pool!r} already has a server named {name!r}")
    if server is None and not present:
        raise Refused(f"pool {pool!r} has no server named {name!r}", missing=True)
    filed = defined(base, pool, name)
    if server is not None and filed is not None and server != filed:
        raise Refused(
            f"the config file defines {pool}/{name} as {config.server_fields(filed)}: add it as the file has it "
            "to undo its removal, or under another name"
        )
    _, notes = apply(base, {**changes, (pool, name): server})
    mine = [note for note in notes if note.startswith(f"{pool}/{name}: ")]
    if mine:
        raise Refused(mine[0])


def defined(base: Config, pool: str, name: str) -> ServerConfig | None:
    """The file's definition of `pool/name` (`base` is the file's config), if it has one."""
    found = base.pools.get(pool)
    return next((server for server in found.servers if server.name == name), None) if found is not None else None
