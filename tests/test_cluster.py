"""A fleet of lbproxy nodes on etcd (issue #18, first part): nodes register and see each other, a node
whose config differs is flagged, a node that leaves is dropped, and a node that loses etcd keeps
serving and says so, then joins again.

A real etcd (Debian's etcd-server) on 127.0.0.1, in a folder of the test's; lbproxy runtimes in this
process, each with its own config file and admin port.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from lbproxy import config, metrics
from lbproxy.etcd import Etcd, EtcdError
from lbproxy.runtime import Runtime
from tests.support import Authority, Backend, Issued, chromium, ctl, eventually, free_port, get, port_of

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (Debian: etcd-server)")


class EtcdProcess:
    """One etcd member on 127.0.0.1 that a test can stop and start again (its data stays); with `tls`
    (a CA and the member's certificate), on https, a client certificate from that CA required."""

    def __init__(self, folder: Path, tls: tuple[Authority, Issued] | None = None, *flags: str) -> None:
        self.folder = folder
        self.client = free_port()
        self.peer = free_port()
        self.tls = tls
        self.flags = list(flags)
        if tls is not None:
            authority, issued = tls
            # No CommonName: with authentication on, etcd 3.4's gateway refuses a client certificate with one.
            self.client_cert = authority.issue("etcd-client", "lbproxy", common_name=False)
            self.flags += ["--cert-file", str(issued.cert), "--key-file", str(issued.key)]
            self.flags += ["--trusted-ca-file", str(authority.path), "--client-cert-auth"]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client}"
        self.process: asyncio.subprocess.Process | None = None

    def session(self) -> aiohttp.ClientSession:
        """A client session that etcd takes (its client certificate, with `tls`)."""
        if self.tls is None:
            return aiohttp.ClientSession()
        context = ssl.create_default_context(cafile=self.tls[0].path)
        context.load_cert_chain(self.client_cert.cert, self.client_cert.key)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))

    async def start(self) -> None:
        with (self.folder / "etcd.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                "etcd",
                *self.flags,
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
        async with self.session() as session:
            etcd = Etcd([self.url], session)

            async def answers() -> bool:
                try:
                    await etcd.get_prefix("/")
                except EtcdError as error:
                    return "user name is empty" in str(error)  # it answers: with authentication on
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
            assert (await action(lb1, "enable"))[0] == 200  # etcd holds "enable" for a
            await etcd.stop()
            await eventually(lambda: not cluster.connected, timeout=10)
            status, body = await action(lb1, "drain")
            assert status == 503
            assert "applied on no node" in str(body["error"])
            assert lb1.pools["farm"].by_name["a"].admin.value == "enabled"  # not on this one either
            status, body = await action(lb1, "drain", local=True)
            assert (status, body["admin"], body["applied_on"]) == (200, "draining", "this node")
            # etcd back: its snapshot's unchanged "enable" does not undo the drain taken here meanwhile
            await etcd.start()
            await eventually(lambda: cluster.connected, timeout=10)
            assert lb1.pools["farm"].by_name["a"].admin.value == "draining"
            assert (await action(lb1, "enable"))[0] == 200  # a fleet action ends it
            assert lb1.pools["farm"].by_name["a"].admin.value == "enabled"


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


async def change(runtime: Runtime, method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
    admin = runtime.bound["admin"]
    url = f"http://{admin.host}:{admin.port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=body, headers={"X-Lbproxy-Admin": "1"}) as response,
    ):
        return response.status, await response.json()


def served(runtime: Runtime) -> list[str]:
    return [server.name for server in runtime.pools["farm"].servers]


async def test_a_server_added_or_removed_on_one_node_is_on_every_node(tmp_path: Path, etcd_folder: Path) -> None:
    async with etcd_running(etcd_folder) as etcd, Backend("a") as backend, Backend("c") as added:
        path = node_config(tmp_path, etcd, backend)
        async with node(path, "lb1") as lb1, node(path, "lb2") as lb2, node(path, "lb3") as lb3:
            fleet = (lb1, lb2, lb3)
            for runtime in fleet:
                await eventually(lambda runtime=runtime: runtime.cluster is not None and runtime.cluster.connected)  # type: ignore[misc]
            status, body = await change(
                lb2, "POST", "/api/v1/pools/farm/servers", {"name": "c", "address": added.address}
            )
            assert (status, body["applied_on"]) == (201, "fleet"), body
            assert served(lb2) == ["a", "c"]  # in force on the node that answered
            await eventually(lambda: [served(runtime) for runtime in fleet] == [["a", "c"]] * 3, timeout=1.0)
            for runtime in fleet:
                assert {(await get(port_of(runtime))).body for _ in range(4)} == {b"a", b"c"}
            state = lb1.cluster_state()
            assert state is not None
            assert state["servers"] == {
                "farm/c": {"name": "c", "address": added.address, "ratio": 1, "backup": False, "max_connections": None}
            }
            # a file's server removed on lb3: gone on every node; a node away reads it from the snapshot
            await lb1.stop()
            status, body = await change(lb3, "DELETE", "/api/v1/pools/farm/servers/a")
            assert (status, body) == (200, {"applied_on": "fleet", "removed": "farm/a"})
            await eventually(lambda: [served(runtime) for runtime in (lb2, lb3)] == [["c"]] * 2, timeout=1.0)
        async with node(path, "lb1") as back:
            await eventually(lambda: served(back) == ["c"])
            assert {(await get(port_of(back))).body for _ in range(3)} == {b"c"}
            # the file's definition undoes the removal; a server added and then removed leaves nothing
            status, body = await change(
                back, "POST", "/api/v1/pools/farm/servers", {"name": "a", "address": backend.address}
            )
            assert status == 201, body
            status, body = await change(back, "DELETE", "/api/v1/pools/farm/servers/c")
            assert status == 200, body
            assert served(back) == ["a"]
            state = back.cluster_state()
            assert state is not None
            assert state["servers"] == {}  # nothing left in etcd for either name
            # etcd away: refused everywhere, unless asked for this node only
            await etcd.stop()
            assert back.cluster is not None
            cluster = back.cluster
            await eventually(lambda: not cluster.connected, timeout=10)
            body = {"name": "c", "address": added.address}
            status, answer = await change(back, "POST", "/api/v1/pools/farm/servers", body)
            assert status == 503
            assert "was added on no node" in str(answer["error"]), answer
            assert served(back) == ["a"]
            status, answer = await change(back, "POST", "/api/v1/pools/farm/servers?local=1", body)
            assert (status, answer["applied_on"]) == (201, "this node")
            assert served(back) == ["a", "c"]


async def test_etcd_over_tls_with_a_client_certificate_and_a_password(tmp_path: Path, etcd_folder: Path) -> None:
    authority = Authority(tmp_path)
    # Tokens live one second: every call of a node's life past the first needs a new one.
    member = EtcdProcess(etcd_folder, (authority, authority.issue("etcd", "127.0.0.1")), "--auth-token-ttl", "1")
    await member.start()
    try:
        async with member.session() as session:  # root, its role, and authentication on
            etcd = Etcd([member.url], session)
            await etcd.call("auth/user/add", {"name": "root", "password": "s3cret"})
            await etcd.call("auth/user/grant", {"user": "root", "role": "root"})
            await etcd.call("auth/enable", {})
        client = authority.issue("lbproxy", "lbproxy", common_name=False)  # see EtcdProcess
        async with Backend("a") as backend:
            path = tmp_path / "tls.yaml"
            path.write_text(
                "admin: {bind: 127.0.0.1:0}\n"
                "cluster:\n  node: ${NODE}\n"
                f"  etcd:\n    endpoints: [{member.url}]\n    prefix: /tls/\n"
                f"    tls: {{ca: {authority.path}, cert: {client.cert}, key: {client.key}}}\n"
                "    username: root\n    password: ${ETCD_PASSWORD}\n"
                "listeners:\n  - {name: web, bind: 127.0.0.1:0, pool: farm}\n"
                f'pools:\n  farm:\n    servers:\n      - {{name: a, address: "{backend.address}"}}\n'
            )
            good = Runtime(config.load(path, environ={"NODE": "lb1", "ETCD_PASSWORD": "s3cret"}))
            bad = Runtime(config.load(path, environ={"NODE": "lb2", "ETCD_PASSWORD": "wrong"}))
            await good.start()
            await bad.start()
            try:
                await eventually(lambda: (good.cluster_state() or {}).get("connected") is True, timeout=10)
                await eventually(lambda: "authentication failed" in str((bad.cluster_state() or {}).get("error")))
                assert names(good) == ["lb1"]  # lb2 never got in
                # The token expires (1 s) while the node renews its lease and watches: it takes a new one.
                await eventually(lambda: good.cluster is not None and good.cluster.renewals >= 1, timeout=10)
                status, body = await action(good, "drain")
                assert (status, body["applied_on"]) == (200, "fleet"), body
                assert good.cluster is not None
                assert good.cluster.connected
                await eventually(lambda: good.cluster is not None and "admin/farm/a" in good.cluster.held)
            finally:
                await bad.stop()
                await good.stop()
    finally:
        await member.stop()
