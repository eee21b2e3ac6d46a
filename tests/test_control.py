"""The controller (lbproxy.control): reloads queue, each built beside the live state and committed in one
step; admin actions apply to the live state meanwhile; versions count commits; snapshots; the state
file's parsing; a pool built beside touches no live server.

The regression tests of the defects the controller fixes (#9 concurrent reloads, #11 a damaged state
file, a drain lost in a refused reload, fsync on the event loop) are in test_operations.py, beside the
other reload and state-file tests, with the helpers used here. lbproxy runs in-process (`running()`) on
127.0.0.1 with real back-ends; the admin API is called over HTTP; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from lbproxy import config
from lbproxy.config import Address, PoolConfig, ServerConfig
from lbproxy.control import Phase, ServerState, parse_state
from lbproxy.pool import WEIGHT_SCALE, AdminState, Pool
from tests.support import Backend, eventually, get, port_of, running
from tests.test_operations import (
    FARM,
    FARM_AND_C,
    NO_HEALTH,
    STALLED,
    TOKEN,
    StalledResolver,
    admin_url,
    post,
    traffic,
    write_config,
)


async def test_reloads_queue_and_admin_actions_during_one_are_carried_into_the_new_pools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While a reload is being built (here: a slow name lookup), a second waits for it, and a drain is
    # applied to the live pool at once; the commit then hands server b over drained.
    resolver = StalledResolver(answer=True)
    monkeypatch.setattr(config, "resolve", resolver)
    async with (
        Backend("a") as a,
        Backend("b") as b,
        Backend("c") as c,
        running(
            FARM, tmp_path, token=TOKEN, state=tmp_path / "state.json", health=NO_HEALTH, a=a.address, b=b.address
        ) as lb,
        aiohttp.ClientSession() as session,
    ):
        base = admin_url(lb)
        version = lb.controller.version
        live = lb.pools["farm"]
        server_b = live.by_name["b"]
        write_config(
            tmp_path,
            FARM_AND_C,
            token=TOKEN,
            state=tmp_path / "state.json",
            health=NO_HEALTH,
            a=a.address,
            b=b.address,
            c=f"{STALLED}:{c.port}",
        )
        reloads = [asyncio.ensure_future(post(session, f"{base}/api/v1/reload")) for _ in range(2)]
        try:
            await eventually(resolver.entered.is_set, what="the first reload to look up the new name")
            assert lb.controller.phase is Phase.BUILDING
            status, body = await post(session, f"{base}/api/v1/pools/farm/servers/b/drain")
            assert (status, body["admin"]) == (200, "draining")
            assert lb.controller.version == version + 1
            # The drain acts on the live pool now, and nothing was built into it.
            assert {(await get(port_of(lb))).body for _ in range(4)} == {b"a"}
            assert lb.pools["farm"] is live
            assert server_b.pool is live
            assert [server.name for server in live.servers] == ["a", "b"]
            assert resolver.calls == 1  # the second reload waits for the first
            assert not any(reload.done() for reload in reloads)
        finally:
            resolver.release.set()
        assert [await reload for reload in reloads] == [(200, {"result": "reloaded"})] * 2
        assert resolver.calls == 2
        assert lb.controller.version == version + 3
        farm = lb.pools["farm"]
        assert farm is not live
        assert farm.by_name["b"] is server_b
        assert server_b.pool is farm
        assert server_b.admin is AdminState.DRAINING
        assert {(await get(port_of(lb))).body for _ in range(6)} == {b"a", b"c"}
        assert not traffic(b)[4:]  # nothing new for b (it had its share before the drain only)
        assert json.loads((tmp_path / "state.json").read_text())["servers"] == {"farm/b": "draining"}


# -- versions and snapshots --------------------------------------------------------------------------------


async def test_the_version_counts_commits_and_a_snapshot_is_the_applied_state(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        Backend("c") as c,
        running(
            FARM, tmp_path, token=TOKEN, state=tmp_path / "state.json", health=NO_HEALTH, a=a.address, b=b.address
        ) as lb,
    ):
        control = lb.controller
        first = control.snapshot()
        assert first.version == 1
        assert first.servers == {
            "farm/a": ServerState(True, AdminState.ENABLED, WEIGHT_SCALE),
            "farm/b": ServerState(True, AdminState.ENABLED, WEIGHT_SCALE),
        }
        lb.drain(lb.server("farm", "a"))
        lb.drain(lb.server("farm", "a"))  # no change: no new version
        lb.set_weight(lb.server("farm", "b"), 50)
        assert control.version == 3
        write_config(tmp_path, "colour: blue\n")
        assert await lb.reload() != []
        assert control.version == 3  # refused: nothing committed
        write_config(
            tmp_path,
            FARM_AND_C,
            token=TOKEN,
            state=tmp_path / "state.json",
            health=NO_HEALTH,
            a=a.address,
            b=b.address,
            c=c.address,
        )
        assert await lb.reload() == []
        snapshot = control.snapshot()
        assert snapshot.version == 4
        assert snapshot.servers == {
            "farm/a": ServerState(True, AdminState.DRAINING, WEIGHT_SCALE),
            "farm/b": ServerState(True, AdminState.ENABLED, WEIGHT_SCALE // 2),
            "farm/c": ServerState(True, AdminState.ENABLED, WEIGHT_SCALE),
        }
        assert snapshot.as_message() == {
            "version": 4,
            "servers": {
                "farm/a": [True, "draining", 100],
                "farm/b": [True, "enabled", 50],
                "farm/c": [True, "enabled", 100],
            },
        }
        assert first.version == 1  # a copy: it never changes
        assert first.servers["farm/a"].admin is AdminState.ENABLED


def test_a_pool_built_beside_touches_no_live_server_until_it_takes_them_over() -> None:
    def farm(ratio_b: int) -> PoolConfig:
        return PoolConfig(
            name="farm",
            servers=(
                ServerConfig("a", Address("10.0.0.1", 80)),
                ServerConfig("b", Address("10.0.0.2", 80), ratio=ratio_b),
            ),
            policy="ratio",
        )

    live = Pool(farm(1))
    server_a, server_b = live.servers
    beside = Pool(farm(4), live, reloading=True)
    assert beside.servers == []
    assert beside.pick() is None
    assert (server_b.ratio, server_b.weight, server_b.pool) == (1, WEIGHT_SCALE, live)
    live.set_admin(server_a, AdminState.DRAINING)  # applied to the live pool while the other is built
    assert {live.pick() for _ in range(4)} == {server_b}
    beside.take_over()
    assert beside.servers == [server_a, server_b]
    assert (server_b.ratio, server_b.weight, server_b.pool) == (4, 4 * WEIGHT_SCALE, beside)
    assert {beside.pick() for _ in range(4)} == {server_b}  # the drain came over with the server
    with pytest.raises(RuntimeError):
        beside.take_over()


def test_a_state_file_entry_that_makes_no_sense_is_skipped_and_the_rest_counts() -> None:
    text = '{"version": 1, "servers": {"farm/a": ["draining"], "farm/b": "disabled", "c": "draining"}}'
    assert parse_state(text) == {"farm/b": AdminState.DISABLED}
