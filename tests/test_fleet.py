"""A fleet of lbproxy nodes as one balancer, on etcd (issue #18), as an operator runs it: one real etcd and
three real `lbproxy run` processes on one config file, told apart by their environment (${NODE},
${PORT}, ${ADMIN_PORT}), each with an admin API of its own, and real back-ends that answer with their
name.

What is checked is what the issue lists: an admin action on one node reaches the others within a
second and outlives a node's restart; a live weight shows on every node; a node killed with SIGKILL
leaves the listing when its lease runs out; without etcd every node serves on, fleet writes are
refused and `--local` ones are not, and the fleet converges when etcd is back; a node on another file
is flagged; a node that cannot reach a server is shown, and keeps its traffic away from it; servers
added and removed at run time on every node.

Every wait has a deadline, every load is bounded, and every process is stopped (killed if it does not
stop) when the test ends. tests/test_cluster.py tests the same fleet with in-process runtimes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lbproxy.cluster import LEASE
from tests.support import LOCALHOST, Backend, ctl, free_port, free_ports, get
from tests.test_cluster import EtcdProcess, etcd_running

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (Debian: etcd-server)")

WRITE = {"X-Lbproxy-Admin": "1"}  # what the admin API wants of a write without a token, on loopback
NAMES = ["lb1", "lb2", "lb3"]
PROBES = "{type: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}"


def fleet_config(etcd: EtcdProcess, b: Backend, extra: str = "") -> str:
    """The fleet's one file: the node's name and ports, and server a's address, from the environment."""
    return (
        "shutdown_timeout: 1s\n"
        'admin:\n  bind: "127.0.0.1:${ADMIN_PORT}"\n'
        f'cluster:\n  node: ${{NODE}}\n  etcd: {{endpoints: ["{etcd.url}"], prefix: /fleet/}}\n'
        'listeners:\n  - {name: web, bind: "127.0.0.1:${PORT}", pool: farm}\n'
        f"pools:\n  farm:\n    policy: ratio\n    health: {PROBES}\n{extra}"
        '    servers:\n      - {name: a, address: "${SERVER_A}"}\n'
        f'      - {{name: b, address: "{b.address}"}}\n'
    )


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Wait until `await check()` is true, polling; the seconds it took, or fail after `timeout`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


class Node:
    """One `lbproxy run` process of the fleet, with its environment and the client of its admin API."""

    def __init__(self, name: str, path: Path, environ: Mapping[str, str], session: aiohttp.ClientSession) -> None:
        self.name = name
        self.path = path
        self.port, self.admin_port = free_ports(2)
        self.environ = {**environ, "NODE": name, "PORT": str(self.port), "ADMIN_PORT": str(self.admin_port)}
        self.admin = f"http://{LOCALHOST}:{self.admin_port}"
        self.log = path.parent / f"{name}.log"
        self.session = session
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and wait until it serves (/readyz: bound, every server probed once)."""
        await self.spawn()
        await until(self.ready, 20, f"{self.name} to be ready")

    async def spawn(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "lbproxy", "run", "-c", str(self.path), "--log-level", "info"),
                stdout=log,
                stderr=log,
                env={**os.environ, **self.environ},
            )

    async def ready(self) -> bool:
        assert self.process is not None
        assert self.process.returncode is None, f"{self.name} exited\n{self.tail()}"
        try:
            async with self.session.get(f"{self.admin}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def stop(self) -> None:
        """SIGTERM (it leaves the fleet: its lease is revoked), then SIGKILL if it has not exited in 10 s."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        try:
            process.terminate()
            await asyncio.wait_for(process.wait(), 10)
        except ProcessLookupError:  # it had exited already
            await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def kill(self) -> None:
        """SIGKILL: it says nothing to etcd, its registration stays until its lease runs out."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self.process = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        headers = WRITE if method != "GET" else {}
        async with self.session.request(method, self.admin + path, json=body, headers=headers) as response:
            return response.status, await response.json()

    async def cluster(self) -> dict[str, Any]:
        status, state = await self.call("GET", "/api/v1/cluster")
        assert status == 200, state
        return dict(state)

    async def listed(self) -> list[str]:
        return [entry["node"] for entry in (await self.cluster())["nodes"]]

    async def servers(self) -> dict[str, dict[str, Any]]:
        """Pool farm's servers as this node has them (admin.server_state), by name."""
        status, pool = await self.call("GET", "/api/v1/pools/farm")
        assert status == 200, pool
        return {server["name"]: server for server in pool["servers"]}

    async def answers(self, count: int) -> Counter[str]:
        """`count` requests through this node, one after the other; which back-end answered how many
        (a back-end answers with its name). Every answer must be a 200."""
        answered: Counter[str] = Counter()
        async with asyncio.timeout(10 + count * 0.1):
            for _ in range(count):
                response = await get(self.port)
                assert response.status == 200, (self.name, response)
                answered[response.body.decode()] += 1
        return answered


class Fleet:
    def __init__(self, etcd: EtcdProcess, nodes: list[Node]) -> None:
        self.etcd = etcd
        self.nodes = nodes

    async def settled(self, names: Sequence[str] = NAMES, timeout: float = 10) -> None:
        """Wait until every running node is connected to etcd and lists `names`, exactly."""

        async def seen() -> bool:
            for node in self.nodes:
                if node.process is not None:
                    state = await node.cluster()
                    if not state["connected"] or [entry["node"] for entry in state["nodes"]] != list(names):
                        return False
            return True

        await until(seen, timeout, f"every node to list {', '.join(names)}")

    async def field(self, server: str, key: str) -> list[Any]:
        """`key` of `server`'s state on each node, in the fleet's order."""
        return [(await node.servers())[server][key] for node in self.nodes]

    async def kill_etcd(self) -> None:
        assert self.etcd.process is not None
        self.etcd.process.send_signal(signal.SIGKILL)
        await self.etcd.process.wait()
        self.etcd.process = None


@asynccontextmanager
async def fleet(
    tmp_path: Path,
    a: Backend,
    b: Backend,
    environ: Mapping[str, Mapping[str, str]] | None = None,
    files: Mapping[str, str] | None = None,
) -> AsyncIterator[Fleet]:
    """etcd and nodes lb1-lb3 on one file, every node listing all three. `environ`: more variables for
    a node; `files`: a node on a file of its own, with these lines added to pool farm."""
    folder = tmp_path / "etcd"
    folder.mkdir()
    connector = aiohttp.TCPConnector(force_close=True)  # a restarted node never meets a stale connection
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        etcd_running(folder) as etcd,
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
    ):
        shared = tmp_path / "lbproxy.yaml"
        shared.write_text(fleet_config(etcd, b))
        nodes = []
        for name in NAMES:
            path = shared
            if files and name in files:
                path = tmp_path / f"{name}.yaml"
                path.write_text(fleet_config(etcd, b, files[name]))
            variables = {"SERVER_A": a.address, **(environ or {}).get(name, {})}
            nodes.append(Node(name, path, variables, session))
        running = Fleet(etcd, nodes)
        try:
            for node in nodes:
                await node.spawn()
            async with asyncio.TaskGroup() as group:  # one that fails stops the others' waits
                for node in nodes:
                    group.create_task(until(node.ready, 20, f"{node.name} to be ready"))
            await running.settled()
            yield running
        except BaseException:
            for node in nodes:
                print(f"--- {node.name} ---\n{node.tail()}")
            raise
        finally:
            await asyncio.gather(*(node.stop() for node in nodes))


async def test_a_drain_on_one_node_reaches_the_others_within_a_second_and_outlives_a_restart(tmp_path: Path) -> None:
    async with Backend("a") as a, Backend("b") as b, fleet(tmp_path, a, b) as running:
        lb1, lb2, lb3 = running.nodes
        assert await running.field("a", "admin") == ["enabled"] * 3
        status, body = await lb1.call("POST", "/api/v1/pools/farm/servers/a/drain")
        answered = time.monotonic()
        assert (status, body["admin"], body["applied_on"]) == (200, "draining", "fleet"), body

        async def drained() -> bool:
            return [(await node.servers())["a"]["admin"] for node in (lb2, lb3)] == ["draining"] * 2

        await until(drained, 5, "lb2 and lb3 to drain a")
        took = time.monotonic() - answered
        assert took < 1.0, f"lb2 and lb3 drained a {took:.2f}s after lb1 answered"
        for node in running.nodes:
            assert await node.answers(10) == {"b": 10}, node.name
        for node in (lb2, lb1):  # another node, then the one that took the call
            await node.restart()  # no state file: what it applies, it reads from etcd
            await running.settled()

            async def still_drained(node: Node = node) -> bool:
                return [(await node.servers())["a"]["admin"]] == ["draining"]

            await until(still_drained, 5, f"the restarted {node.name} to have a draining again")
            assert await running.field("a", "admin") == ["draining"] * 3
            assert await node.answers(10) == {"b": 10}, node.name


async def test_a_weight_set_on_one_node_shows_on_every_node(tmp_path: Path) -> None:
    async with Backend("a") as a, Backend("b") as b, fleet(tmp_path, a, b) as running:
        lb3 = running.nodes[2]
        assert await running.field("a", "weight") == [1.0] * 3
        status, body = await lb3.call("POST", "/api/v1/pools/farm/servers/a/weight", {"percent": 50})
        assert (status, body["weight"], body["applied_on"]) == (200, 0.5, "fleet"), body

        async def weighed() -> bool:
            return await running.field("a", "weight") == [0.5] * 3

        await until(weighed, 1.0, "a's weight to be 0.5 on every node")
        assert await running.field("b", "weight") == [1.0] * 3
        for node in running.nodes:  # policy ratio: any 3 picks in a row give a one and b two
            assert await node.answers(30) == {"a": 10, "b": 20}, node.name


async def test_a_node_killed_leaves_the_listing_when_its_lease_runs_out(tmp_path: Path) -> None:
    async with Backend("a") as a, Backend("b") as b, fleet(tmp_path, a, b) as running:
        lb1, lb3 = running.nodes[0], running.nodes[2]
        await lb3.kill()
        killed = time.monotonic()
        assert await lb1.listed() == NAMES  # it said nothing: etcd holds its registration for now
        await running.settled(["lb1", "lb2"], timeout=LEASE + 5)
        # with its lease, not at once: renewed every LEASE/3, it had at least 2/3 of it left
        assert time.monotonic() - killed > LEASE / 3
        assert await lb1.answers(4) == {"a": 2, "b": 2}


async def test_without_etcd_every_node_serves_on_and_the_fleet_converges_when_it_is_back(tmp_path: Path) -> None:
    async with Backend("a") as a, Backend("b") as b, fleet(tmp_path, a, b) as running:
        lb1, lb2, lb3 = running.nodes
        status, body = await lb1.call("POST", "/api/v1/pools/farm/servers/a/weight", {"percent": 50})
        assert status == 200, body

        async def weighed() -> bool:
            return await running.field("a", "weight") == [0.5] * 3

        await until(weighed, 5, "a's weight to be 0.5 on every node")

        # A bounded load over the three nodes (100 requests each over about 2 s) while etcd dies.
        statuses: list[int] = []

        async def load(node: Node) -> None:
            started = time.monotonic()
            for index in range(100):
                await asyncio.sleep(max(0.0, started + index * 0.02 - time.monotonic()))
                try:
                    statuses.append((await get(node.port)).status)
                except Exception as error:  # refused, reset, timed out, not HTTP: all client errors
                    statuses.append(0)
                    print(f"{node.name}: {error!r}")

        async def under_way() -> bool:
            return len(statuses) >= 60

        async with asyncio.timeout(30), asyncio.TaskGroup() as loads:
            for node in running.nodes:
                loads.create_task(load(node))
            await until(under_way, 10, "the load to be under way")
            await running.kill_etcd()
        assert len(statuses) == 300
        assert Counter(statuses) == {200: 300}

        async def all_alone() -> bool:
            return [(await node.cluster())["connected"] for node in running.nodes] == [False] * 3

        await until(all_alone, 10, "every node to say it cannot reach etcd")
        assert await lb1.answers(30) == {"a": 10, "b": 20}  # the weight holds
        for method, path, body in (  # fleet writes: refused, and applied on no node
            ("POST", "/api/v1/pools/farm/servers/b/drain", None),
            ("POST", "/api/v1/pools/farm/servers", {"name": "s5", "address": b.address}),
            ("DELETE", "/api/v1/pools/farm/servers/b", None),
        ):
            status, answer = await lb2.call(method, path, body)
            assert status == 503, (method, path, answer)
            assert "etcd cannot be reached" in answer["error"], (method, path, answer)
        assert await running.field("b", "admin") == ["enabled"] * 3
        assert [sorted(await node.servers()) for node in running.nodes] == [["a", "b"]] * 3
        code, local, err = await ctl("drain", "farm", "a", "--local", "--admin", lb3.admin)
        assert code == 0, err
        assert await running.field("a", "admin") == ["enabled", "enabled", "draining"]
        status, body = await lb3.call("POST", "/api/v1/pools/farm/servers/a/enable?local=1")
        assert (status, body["admin"], body["applied_on"]) == (200, "enabled", "this node"), body
        await lb3.restart()  # it starts with its file alone: a's weight is the file's
        assert (await lb3.servers())["a"]["weight"] == 1.0
        assert not (await lb3.cluster())["connected"]

        await running.etcd.start()  # with its data: what the fleet wrote before is there
        await running.settled()
        status, body = await lb2.call("POST", "/api/v1/pools/farm/servers/b/drain")
        assert (status, body["applied_on"]) == (200, "fleet"), body

        async def converged() -> bool:
            servers = [await node.servers() for node in running.nodes]
            return [(s["a"]["weight"], s["a"]["admin"], s["b"]["admin"]) for s in servers] == [
                (0.5, "enabled", "draining")
            ] * 3

        await until(converged, 5, "every node to have a at 0.5 and b draining")
        for node in running.nodes:
            assert await node.answers(5) == {"a": 5}, node.name
        # and `ctl --local` said what it did, as add-server and remove-server do ("on this node only")
        assert "this node" in local, local


async def test_a_node_on_another_file_is_flagged(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        fleet(tmp_path, a, b, files={"lb3": "    retries: 1\n"}) as running,
    ):
        for node in running.nodes:
            state = await node.cluster()
            flagged = {entry["node"]: entry["config_differs"] for entry in state["nodes"]}
            assert flagged == {"lb1": False, "lb2": False, "lb3": True}, node.name
            hashes = {entry["node"]: entry["config_hash"] for entry in state["nodes"]}
            assert hashes["lb1"] == hashes["lb2"] != hashes["lb3"]
        code, out, err = await ctl("cluster", "--admin", running.nodes[0].admin)
        assert code == 0, err
        assert [line.split()[0] for line in out.splitlines()[2:] if "DIFFERS" in line] == ["lb3"], out


async def test_a_node_that_cannot_reach_a_server_is_shown_and_keeps_its_traffic_from_it(tmp_path: Path) -> None:
    # lb3 runs the same file (same hash) but is told an address for a where nothing listens: a broken
    # network path between lb3 and a, for lb3 only
    nowhere = {"lb3": {"SERVER_A": f"{LOCALHOST}:{free_port()}"}}
    async with Backend("a") as a, Backend("b") as b, fleet(tmp_path, a, b, environ=nowhere) as running:
        lb1, lb2, lb3 = running.nodes
        assert await running.field("a", "state") == ["up", "up", "down"]
        shown = {"farm/a": {"up": ["lb1", "lb2"], "down": ["lb3"]}}

        async def disagreement_shown() -> bool:
            return [(await node.cluster())["disagreements"] for node in running.nodes] == [shown] * 3

        await until(disagreement_shown, 5, "every node to show that lb3 sees a down")
        assert [entry["config_differs"] for entry in (await lb1.cluster())["nodes"]] == [False] * 3
        assert await lb3.answers(10) == {"b": 10}
        for node in (lb1, lb2):
            assert await node.answers(10) == {"a": 5, "b": 5}, node.name


async def test_a_server_added_at_run_time_serves_on_every_node_and_removed_serves_on_none(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        Backend("s5") as s5,
        fleet(tmp_path, a, b) as running,
    ):
        lb1, lb2, lb3 = running.nodes
        added = {"name": "s5", "address": s5.address, "ratio": 1, "backup": False}
        status, body = await lb2.call("POST", "/api/v1/pools/farm/servers", added)
        assert status == 201, body
        assert (body["applied_on"], body["server"]["name"], body["server"]["address"]) == ("fleet", "s5", s5.address)

        async def up_everywhere() -> bool:
            return [(await node.servers()).get("s5", {}).get("state") for node in running.nodes] == ["up"] * 3

        await until(up_everywhere, 5, "s5 to be up on every node")
        for node in running.nodes:  # three servers of ratio 1: a rotation
            assert await node.answers(30) == {"a": 10, "b": 10, "s5": 10}, node.name
        await lb1.restart()  # its file lacks s5: it reads it from etcd
        await running.settled()
        await until(up_everywhere, 5, "s5 to be up on the restarted lb1")
        assert await lb1.answers(30) == {"a": 10, "b": 10, "s5": 10}

        for path, body, expected in (
            ("/api/v1/pools/farm/servers", added, 409),  # the name is taken
            ("/api/v1/pools/nope/servers", added, 404),
            ("/api/v1/pools/farm/servers", {"name": "s6"}, 400),  # no address
            ("/api/v1/pools/farm/servers", {"name": "s6", "address": "not an address"}, 400),
        ):
            status, answer = await lb1.call("POST", path, body)
            assert status == expected, (path, body, answer)

        status, body = await lb3.call("DELETE", "/api/v1/pools/farm/servers/s5")
        assert (status, body) == (200, {"applied_on": "fleet", "removed": "farm/s5"})

        async def gone_everywhere() -> bool:
            return ["s5" in await node.servers() for node in running.nodes] == [False] * 3

        await until(gone_everywhere, 5, "s5 to be gone from every node")
        served = len(s5.requests)
        for node in running.nodes:
            assert await node.answers(10) == {"a": 5, "b": 5}, node.name
        assert len(s5.requests) == served
        assert (await lb1.call("DELETE", "/api/v1/pools/farm/servers/s5"))[0] == 404

        # The same from a shell, through other nodes
        code, out, err = await ctl("add-server", "farm", "s5", s5.address, "--ratio", "2", "--admin", lb1.admin)
        assert (code, "every node of the fleet" in out) == (0, True), (out, err)
        await until(up_everywhere, 5, "s5 (from ctl) to be up on every node")
        assert await running.field("s5", "ratio") == [2] * 3
        code, out, err = await ctl("remove-server", "farm", "s5", "--admin", lb2.admin)
        assert (code, "every node of the fleet" in out) == (0, True), (out, err)
        await until(gone_everywhere, 5, "s5 (removed by ctl) to be gone from every node")
