"""A fleet of lbproxy nodes on etcd (issue #18, first part): nodes register and see each other, a node
whose config differs is flagged, a node that leaves is dropped, and a node that loses etcd keeps
serving and says so, then joins again.

A real etcd (Debian's etcd-server) on 127.0.0.1, in a folder of the test's; lbproxy runtimes in this
process, each with its own config file and admin port.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from lbproxy import config, metrics
from lbproxy.etcd import Etcd
from lbproxy.runtime import Runtime
from tests.support import Backend, chromium, ctl, eventually, free_port, get, port_of

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (Debian: etcd-server)")


class EtcdProcess:
    """One etcd member on 127.0.0.1 that a test can stop and start again (its data stays)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.client = free_port()
        self.peer = free_port()
        self.url = f"http://127.0.0.1:{self.client}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with (self.folder / "etcd.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                "etcd",
                "--data-dir",
                str(self.folder / "data"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.peer}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{self.peer}",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        async with aiohttp.ClientSession() as session:
            etcd = Etcd([self.url], session)

            async def answers() -> bool:
                try:
                    await etcd.get_prefix("/")
                except Exception:
                    return False
                return True

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not await answers():
                assert loop.time() < deadline, (self.folder / "etcd.log").read_text()[-2000:]
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 20)
            self.process = None


@pytest.fixture
def etcd_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "etcd"
    folder.mkdir()
    return folder


@asynccontextmanager
async def etcd_running(folder: Path) -> AsyncIterator[EtcdProcess]:
    member = EtcdProcess(folder)
    await member.start()
    try:
        yield member
    finally:
        await member.stop()


def node_config(folder: Path, etcd: EtcdProcess, backend: Backend, extra: str = "") -> Path:
    """One config file for every node (its name from ${NODE}), as a fleet shares one file."""
    path = folder / f"lbproxy{len(extra)}.yaml"
    path.write_text(
        "admin: {bind: 127.0.0.1:0}\n"
        f"cluster:\n  node: ${{NODE}}\n  etcd: {{endpoints: [{etcd.url}], prefix: /test/}}\n"
        "listeners:\n  - {name: web, bind: 127.0.0.1:0, pool: farm}\n"
        f'pools:\n  farm:\n    servers:\n      - {{name: a, address: "{backend.address}"}}\n{extra}'
    )
    return path


@asynccontextmanager
async def node(path: Path, name: str) -> AsyncIterator[Runtime]:
    runtime = Runtime(config.load(path, environ={"NODE": name}))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def names(runtime: Runtime) -> list[str]:
    state = runtime.cluster_state()
    assert state is not None
    return [entry["node"] for entry in state["nodes"]]


async def test_nodes_see_each_other_and_a_different_config_is_flagged(tmp_path: Path, etcd_folder: Path) -> None:
    async with etcd_running(etcd_folder) as etcd, Backend("a") as backend:
        same = node_config(tmp_path, etcd, backend)
        other = node_config(tmp_path, etcd, backend, extra="    retries: 1\n")
        async with node(same, "lb1") as lb1, node(same, "lb2") as lb2, node(other, "lb3") as lb3:
            for runtime in (lb1, lb2, lb3):
                await eventually(lambda runtime=runtime: names(runtime) == ["lb1", "lb2", "lb3"])  # type: ignore[misc]
            state = lb1.cluster_state()
            assert state is not None
            assert state["connected"] is True
            assert {entry["node"]: entry["config_differs"] for entry in state["nodes"]} == {
                "lb1": False,
                "lb2": False,
                "lb3": True,
            }
            assert [entry["self"] for entry in state["nodes"]] == [True, False, False]
            assert state["nodes"][0]["listeners"] == [f"web {lb1.config.listeners[0].bind}"]
            admin = lb2.bound["admin"]
            url = f"http://{admin.host}:{admin.port}/api/v1/cluster"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert response.status == 200
                assert [entry["node"] for entry in (await response.json())["nodes"]] == ["lb1", "lb2", "lb3"]
            code, out, err = await ctl("cluster", "--admin", f"http://{admin.host}:{admin.port}")
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0] == "node lb2: connected to etcd"
            assert [line.split()[0] for line in lines[2:]] == ["lb1", "lb2", "lb3"]
            assert "(this)" in lines[3]
            assert "DIFFERS" in lines[4]
            await lb3.stop()  # it leaves: its registration goes with its lease
            await eventually(lambda: names(lb1) == ["lb1", "lb2"])
            families = {family.name: family for family in metrics.families(metrics.read(lb1))}
            assert [s.value for s in families["lbproxy_cluster_nodes"].samples] == [2]


async def test_a_node_without_etcd_keeps_serving_and_joins_again(tmp_path: Path, etcd_folder: Path) -> None:
    async with etcd_running(etcd_folder) as etcd, Backend("a") as backend:
        path = node_config(tmp_path, etcd, backend)
        async with node(path, "lb1") as lb1:
            assert lb1.cluster is not None
            cluster = lb1.cluster
            await eventually(lambda: cluster.connected)
            await etcd.stop()
            await eventually(lambda: not cluster.connected, timeout=10)
            assert (await get(port_of(lb1))).status == 200  # the farm is served as it was
            families = {family.name: family for family in metrics.families(metrics.read(lb1))}
            assert [s.value for s in families["lbproxy_cluster_connected"].samples] == [0]
            await etcd.start()
            await eventually(lambda: cluster.connected, timeout=10)
            assert names(lb1) == ["lb1"]


def test_the_cluster_block_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.yaml"
    path.write_text(
        "cluster:\n  node: 'lb 1'\n  etcd: {endpoints: ['10.0.0.1:2379'], prefix: /p}\n"
        "listeners:\n  - {name: web, bind: 127.0.0.1:8080, pool: farm}\n"
        "pools:\n  farm:\n    servers:\n      - {name: a, address: 10.0.0.1:80}\n"
    )
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    problems = [str(problem) for problem in caught.value.problems]
    assert any("cluster.node" in problem for problem in problems), problems
    assert any(
        "cluster.etcd.endpoints[0]: expected an etcd endpoint such as http://10.56.1.5:2379" in problem
        for problem in problems
    ), problems


async def action(runtime: Runtime, verb: str, local: bool = False) -> tuple[int, dict[str, object]]:
    admin = runtime.bound["admin"]
    url = f"http://{admin.host}:{admin.port}/api/v1/pools/farm/servers/a/{verb}" + ("?local=1" if local else "")
    async with aiohttp.ClientSession() as session, session.post(url, headers={"X-Lbproxy-Admin": "1"}) as response:
        return response.status, await response.json()


async def test_an_admin_action_on_one_node_applies_on_every_node(tmp_path: Path, etcd_folder: Path) -> None:
    async with etcd_running(etcd_folder) as etcd, Backend("a") as backend:
        path = node_config(tmp_path, etcd, backend)
        async with node(path, "lb1") as lb1, node(path, "lb2") as lb2, node(path, "lb3") as lb3:
            fleet = (lb1, lb2, lb3)
            for runtime in fleet:
                await eventually(lambda runtime=runtime: runtime.cluster is not None and runtime.cluster.connected)  # type: ignore[misc]

            def states() -> list[str]:
                return [runtime.pools["farm"].by_name["a"].admin.value for runtime in fleet]

            status, body = await action(lb2, "drain")  # to any node
            assert (status, body["admin"], body["applied_on"]) == (200, "draining", "fleet")
            await eventually(lambda: states() == ["draining"] * 3, timeout=1.0)  # within 1 s
            code, out, err = await ctl(
                "enable", "farm", "a", "--admin", f"http://{lb3.bound['admin'].host}:{lb3.bound['admin'].port}"
            )
            assert (code, out.strip()) == (0, "farm/a: enabled, up, 0 in flight (every node of the fleet)"), err
            await eventually(lambda: states() == ["enabled"] * 3, timeout=1.0)
            await lb3.stop()  # it misses what follows...
            assert (await action(lb1, "disable"))[0] == 200
            await eventually(lambda: states()[:2] == ["disabled"] * 2, timeout=1.0)
        async with node(path, "lb3") as back:  # ...and reads it from the snapshot when it comes back
            assert back.cluster is not None
            await eventually(lambda: back.pools["farm"].by_name["a"].admin.value == "disabled")


async def test_without_etcd_an_action_is_applied_nowhere_unless_asked_for_this_node(
    tmp_path: Path, etcd_folder: Path
) -> None:
    async with etcd_running(etcd_folder) as etcd, Backend("a") as backend:
        path = node_config(tmp_path, etcd, backend)
        async with node(path, "lb1") as lb1:
            cluster = lb1.cluster
            assert cluster is not None
            await eventually(lambda: cluster.connected)
            await etcd.stop()
            await eventually(lambda: not cluster.connected, timeout=10)
            status, body = await action(lb1, "drain")
            assert status == 503
            assert "applied on no node" in str(body["error"])
            assert lb1.pools["farm"].by_name["a"].admin.value == "enabled"  # not on this one either
            status, body = await action(lb1, "drain", local=True)
            assert (status, body["admin"], body["applied_on"]) == (200, "draining", "this node")


async def test_a_live_weight_set_on_one_node_is_set_on_every_node(tmp_path: Path, etcd_folder: Path) -> None:
    async with etcd_running(etcd_folder) as etcd, Backend("a") as backend:
        path = node_config(tmp_path, etcd, backend)
        async with node(path, "lb1") as lb1, node(path, "lb2") as lb2:
            for runtime in (lb1, lb2):
                await eventually(lambda runtime=runtime: runtime.cluster is not None and runtime.cluster.connected)  # type: ignore[misc]
            admin = lb1.bound["admin"]
            code, out, err = await ctl("weight", "farm", "a", "40", "--admin", f"http://{admin.host}:{admin.port}")
            assert (code, out.strip()) == (
                0,
                "farm/a: enabled, up, 0 in flight, weight 0.4 (every node of the fleet)",
            ), err
            await eventually(lambda: lb2.pools["farm"].by_name["a"].reported == 40, timeout=1.0)
            drained = await action(lb2, "drain")  # a drain does not undo the weight, nor the reverse
            assert drained[0] == 200
            await eventually(lambda: lb1.pools["farm"].by_name["a"].admin.value == "draining", timeout=1.0)
            assert lb1.pools["farm"].by_name["a"].reported == 40
            url = f"http://{admin.host}:{admin.port}/api/v1/pools/farm/servers/a/weight"
            async with aiohttp.ClientSession() as session:
                for body in ({"percent": 101}, {"percent": "40"}, {}):
                    async with session.post(url, json=body, headers={"X-Lbproxy-Admin": "1"}) as response:
                        assert response.status == 400


async def test_each_node_publishes_what_it_sees_and_disagreements_are_shown(tmp_path: Path, etcd_folder: Path) -> None:
    probe = "    health: {type: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}\n"
    async with etcd_running(etcd_folder) as etcd, Backend("a") as backend:
        reachable = node_config(tmp_path, etcd, backend, extra=probe)
        # lb2 reaches server a at an address where nothing listens: a broken network path, for it only
        unreachable = tmp_path / "unreachable.yaml"
        unreachable.write_text(reachable.read_text().replace(backend.address, f"127.0.0.1:{free_port()}"))
        async with node(reachable, "lb1") as lb1, node(unreachable, "lb2") as lb2:
            await eventually(lambda: not lb2.pools["farm"].by_name["a"].up)
            assert lb1.pools["farm"].by_name["a"].up  # each node decides for itself
            assert lb1.cluster is not None

            def seen() -> object:
                state = lb1.cluster_state()
                return state["disagreements"] if state is not None else None

            await eventually(lambda: seen() == {"farm/a": {"up": ["lb1"], "down": ["lb2"]}})
            families = {family.name: family for family in metrics.families(metrics.read(lb1))}
            assert [s.value for s in families["lbproxy_cluster_health_disagreements"].samples] == [1]
            with chromium(tmp_path) as browser:  # the status page shows the fleet
                admin = lb1.bound["admin"]
                await asyncio.to_thread(browser.get, f"http://{admin.host}:{admin.port}/")
                script = """return [...document.querySelectorAll('#fleet [data-node], #fleet [data-disagreement]')]
                    .map((line) => line.textContent);"""
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while len(shown := await asyncio.to_thread(browser.execute_script, script)) < 3:
                    assert loop.time() < deadline, shown
                    await asyncio.sleep(0.1)
                assert shown[0].startswith("lb1 (this node) · 0.1.0 · config ")
                assert shown[1].startswith("lb2 · 0.1.0 · config ")
                assert shown[1].endswith(" differs") != shown[0].endswith(" differs")  # two nodes: one of them
                assert shown[2] == "farm/a: up on lb1, down on lb2"
            await lb2.stop()  # its view goes with its lease
            await eventually(lambda: seen() == {})


async def test_the_file_is_the_base_and_the_fleets_admin_states_apply_on_top(
    tmp_path: Path, etcd_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODE", "lb1")  # a reload reads the file with the process's environment
    async with etcd_running(etcd_folder) as etcd, Backend("a") as backend, Backend("b") as other:
        path = node_config(tmp_path, etcd, backend)
        with_b = path.read_text() + f'      - {{name: b, address: "{other.address}"}}\n'
        path.write_text(with_b)
        async with node(path, "lb1") as lb1:
            assert lb1.cluster is not None
            await eventually(lambda: lb1.cluster is not None and lb1.cluster.connected)
            admin = lb1.bound["admin"]
            url = f"http://{admin.host}:{admin.port}/api/v1/pools/farm/servers/b/drain"
            async with aiohttp.ClientSession() as session, session.post(url, headers={"X-Lbproxy-Admin": "1"}) as got:
                assert got.status == 200
            # the file changes b's address: the fleet's drain still holds (by name), the address is the file's
            moved = Backend("b")
            async with moved:
                path.write_text(with_b.replace(other.address, moved.address))
                assert await lb1.reload() == []
                server = lb1.pools["farm"].by_name["b"]
                assert (server.admin.value, str(server.address)) == ("draining", moved.address)
                # the file drops b, then brings it back: it comes back drained, as the fleet has it
                path.write_text(with_b.split("      - {name: b")[0])
                assert await lb1.reload() == []
                assert "b" not in lb1.pools["farm"].by_name
                path.write_text(with_b.replace(other.address, moved.address))
                assert await lb1.reload() == []
                assert lb1.pools["farm"].by_name["b"].admin.value == "draining"
