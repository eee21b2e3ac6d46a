"""Servers added and removed at run time, on one node (no cluster block): the rules of
lbproxy.server_changes, the admin API and `lbproxy ctl` that drive them, and what a file reload keeps.
The fleet's side is in test_cluster.py and test_fleet.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lbproxy import config, server_changes
from lbproxy.config import Address, ServerConfig
from lbproxy.runtime import Runtime
from tests.support import Backend, admin_farm, ctl, eventually, get, port_of, running


def file_config(tmp_path: Path, servers: str, extra: str = "") -> config.Config:
    path = tmp_path / "unit.yaml"
    path.write_text(
        f"listeners:\n  - {{name: web, bind: 127.0.0.1:0, pool: farm}}\npools:\n  farm:\n{extra}    servers:\n{servers}"
    )
    return config.load(path, environ={})


TWO = "      - {name: a, address: 127.0.0.1:1001}\n      - {name: b, address: 127.0.0.1:1002}\n"


def names(whole: config.Config) -> list[str]:
    return [server.name for server in whole.pools["farm"].servers]


def test_changes_apply_on_top_of_the_file_by_name(tmp_path: Path) -> None:
    base = file_config(tmp_path, TWO)
    added = ServerConfig("c", Address("127.0.0.1", 1003), ratio=2)
    whole, notes = server_changes.apply(base, {("farm", "c"): added, ("farm", "a"): None})
    assert (names(whole), notes) == (["b", "c"], [])
    assert whole.pools["farm"].servers[1] == added
    assert names(base) == ["a", "b"]  # the file's config is left as it is

    # A definition under a name the file has: the file's applies, and the note says so.
    moved = ServerConfig("b", Address("127.0.0.1", 2002))
    whole, notes = server_changes.apply(base, {("farm", "b"): moved})
    assert whole.pools["farm"].servers[1].address == Address("127.0.0.1", 1002)
    assert notes == ["farm/b: the config file defines it: the file's definition applies, not the one added"]
    # ... while the file's own definition is how a removal is undone, without a note.
    assert server_changes.apply(base, {("farm", "b"): base.pools["farm"].servers[1]}) == (base, [])

    # Never below min_up; a pool the file lacks.
    whole, notes = server_changes.apply(base, {("farm", "a"): None, ("farm", "b"): None, ("gone", "x"): None})
    assert names(whole) == ["b"]
    assert notes == [
        "farm/b: not removed: it would leave the pool 0 primary servers, fewer than its min_up 1",
        "gone/x: the config has no pool 'gone': not applied",
    ]


def test_refusals_name_what_is_wrong(tmp_path: Path) -> None:
    base = file_config(tmp_path, TWO)
    new = ServerConfig("c", Address("127.0.0.1", 1003))

    def refused(pool: str, name: str, server: ServerConfig | None, changes: Any = None) -> tuple[str, bool]:
        with pytest.raises(server_changes.Refused) as caught:
            server_changes.refusal(base, changes or {}, pool, name, server)
        return str(caught.value), caught.value.missing

    assert refused("nope", "c", new) == ("no pool named 'nope'", True)
    assert refused("farm", "a", ServerConfig("a", Address("127.0.0.1", 1001))) == (
        "pool 'farm' already has a server named 'a'",
        False,
    )
    assert refused("farm", "z", None) == ("pool 'farm' has no server named 'z'", True)
    assert refused("farm", "b", None, {("farm", "a"): None})[0].startswith("farm/b: not removed")
    message, _ = refused("farm", "a", ServerConfig("a", Address("127.0.0.1", 9)), {("farm", "a"): None})
    assert message.startswith("the config file defines farm/a as {'name': 'a', 'address': '127.0.0.1:1001'")
    server_changes.refusal(base, {}, "farm", "c", new)  # fine: nothing raised
    server_changes.refusal(base, {("farm", "a"): None}, "farm", "a", base.pools["farm"].servers[0])


def test_a_definition_from_the_api_is_checked_as_the_files_are() -> None:
    assert config.server_from({"name": "c", "address": "127.0.0.1:80", "backup": True}) == ServerConfig(
        "c", Address("127.0.0.1", 80), backup=True
    )
    for fields, message in (
        ({"name": "c"}, "address: missing"),
        ({"name": "c d", "address": "127.0.0.1:80"}, "name: "),
        ({"name": "c", "address": "127.0.0.1"}, "address: expected HOST:PORT"),
        ({"name": "c", "address": "127.0.0.1:80", "ratio": 0}, "ratio: expected an integer from 1 to 256"),
        ({"name": "c", "address": "127.0.0.1:80", "weight": 3}, "unknown key 'weight'"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            config.server_from(fields)


async def call(runtime: Runtime, method: str, path: str, body: object = None) -> tuple[int, dict[str, Any]]:
    admin = runtime.bound["admin"]
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://{admin.host}:{admin.port}{path}", json=body, headers={"X-Lbproxy-Admin": "1"}
        ) as response,
    ):
        return response.status, await response.json()


async def served_by(runtime: Runtime, count: int) -> set[bytes]:
    return {(await get(port_of(runtime))).body for _ in range(count)}


@asynccontextmanager
async def farm(tmp_path: Path, *more: str) -> AsyncIterator[tuple[Runtime, dict[str, Backend]]]:
    """lbproxy on pool farm of a and b, and back-ends `more` that it does not have yet."""
    backends = {name: Backend(name) for name in ("a", "b", *more)}
    async with contextlib.AsyncExitStack() as stack:
        for backend in backends.values():
            await stack.enter_async_context(backend)
        a, b = backends["a"].address, backends["b"].address
        yield await stack.enter_async_context(running(admin_farm(), tmp_path, a=a, b=b)), backends


async def test_a_server_added_gets_traffic_and_a_removed_one_none(tmp_path: Path) -> None:
    async with farm(tmp_path, "c") as (lb, backends):
        a, c = backends["a"], backends["c"]
        assert await served_by(lb, 4) == {b"a", b"b"}
        status, body = await call(lb, "POST", "/api/v1/pools/farm/servers", {"name": "c", "address": c.address})
        assert (status, body["applied_on"], body["server"]["name"]) == (201, "this node", "c"), body
        assert await served_by(lb, 6) == {b"a", b"b", b"c"}  # in force when the API answered
        status, body = await call(lb, "DELETE", "/api/v1/pools/farm/servers/a")
        assert (status, body) == (200, {"applied_on": "this node", "removed": "farm/a"})
        assert await served_by(lb, 6) == {b"b", b"c"}
        status, body = await call(lb, "GET", "/api/v1/pools")
        assert body["servers_changed"] == {
            "farm/a": {"change": "removed", "by": "this node"},
            "farm/c": {
                "change": {"name": "c", "address": c.address, "ratio": 1, "backup": False, "max_connections": None},
                "by": "this node",
            },
        }
        # A reload of the file keeps what was changed at run time.
        assert lb.reloads["success"] == 2  # a change at run time is a reload that keeps the file
        assert await lb.reload() == []
        assert [server.name for server in lb.pools["farm"].servers] == ["b", "c"]
        # The file's own definition undoes the removal.
        status, body = await call(lb, "POST", "/api/v1/pools/farm/servers", {"name": "a", "address": a.address})
        assert status == 201, body
        assert await served_by(lb, 6) == {b"a", b"b", b"c"}


async def test_the_api_refuses_what_it_cannot_apply_and_changes_nothing(tmp_path: Path) -> None:
    async with farm(tmp_path) as (lb, backends):
        a = backends["a"]
        servers = "/api/v1/pools/farm/servers"
        for method, path, body, status, message in (
            ("POST", servers, {"name": "c"}, 400, "address: missing"),
            ("POST", servers, ["c"], 400, "expected a JSON object with name and address"),
            ("POST", "/api/v1/pools/nope/servers", {"name": "c", "address": a.address}, 404, "no pool named 'nope'"),
            ("POST", servers, {"name": "a", "address": a.address}, 409, "already has a server named 'a'"),
            ("POST", servers, {"name": "c", "address": "no-such-host.invalid:80"}, 400, "address: cannot resolve"),
            ("DELETE", f"{servers}/z", None, 404, "pool 'farm' has no server named 'z'"),
        ):
            answer = await call(lb, method, path, body)
            assert answer[0] == status, answer
            assert message in answer[1]["error"], answer
        assert (await call(lb, "DELETE", f"{servers}/a"))[0] == 200
        status, body = await call(lb, "DELETE", f"{servers}/b")
        assert status == 409
        assert body["error"] == (
            "farm/b: not removed: it would leave the pool 0 primary servers, fewer than its min_up 1"
        )
        assert [server.name for server in lb.pools["farm"].servers] == ["b"]
        assert lb.reloads == {"success": 1, "failure": 0}  # the removal of a; nothing refused was tried


async def test_ctl_adds_and_removes_servers(tmp_path: Path) -> None:
    async with farm(tmp_path, "c") as (lb, backends):
        c = backends["c"]
        admin = f"http://{lb.bound['admin'].host}:{lb.bound['admin'].port}"
        code, out, err = await ctl("add-server", "farm", "c", c.address, "--ratio", "3", "--admin", admin)
        assert (code, out.strip()) == (0, "farm/c: added on this node only"), err
        assert lb.pools["farm"].by_name["c"].ratio == 3
        code, out, err = await ctl("remove-server", "farm", "c", "--admin", admin)
        assert (code, out.strip()) == (0, "farm/c: removed on this node only"), err
        await eventually(lambda: "c" not in lb.pools["farm"].by_name)
        code, out, err = await ctl("remove-server", "farm", "zz", "--admin", admin)
        assert (code, err.strip()) == (
            1,
            "lbproxy ctl: DELETE /api/v1/pools/farm/servers/zz: 404 pool 'farm' has no server named 'zz'",
        )


async def test_a_file_that_defines_a_server_added_at_run_time_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with farm(tmp_path, "c", "c2") as (lb, backends):
        c, moved = backends["c"], backends["c2"]
        assert (await call(lb, "POST", "/api/v1/pools/farm/servers", {"name": "c", "address": c.address}))[0] == 201
        path = lb.config.path
        path.write_text(path.read_text() + f'      - {{name: c, address: "{moved.address}"}}\n')
        assert await lb.reload() == []
        assert str(lb.pools["farm"].by_name["c"].address) == moved.address  # the file's definition
        assert await served_by(lb, 6) == {b"a", b"b", b"c2"}
        assert "farm/c: the config file defines it: the file's definition applies, not the one added" in caplog.text
