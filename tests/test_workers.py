"""`lbproxy run --workers 2` as a real process tree: both workers serve, the supervisor's state and
drains reach them, metrics are summed over them, and a worker that dies comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import LOCALHOST, Backend, eventually, free_port, get

CONFIG = """\
admin:
  bind: "127.0.0.1:{admin}"
listeners:
  - name: web
    bind: "127.0.0.1:{port}"
    pool: farm
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "{b}"}}
"""


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(child) for child in text)
    return found


class Tree:
    def __init__(self, process: asyncio.subprocess.Process, port: int, admin: int, path: Path) -> None:
        self.process = process
        self.path = path
        self.port = port
        self.admin = f"http://{LOCALHOST}:{admin}"

    async def metrics(self) -> dict[str, float]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.admin}/metrics") as response:
            text = await response.text()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
        return values

    async def ready(self) -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(f"{self.admin}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False


@pytest.fixture
async def tree(tmp_path: Path) -> AsyncIterator[tuple[Tree, Backend, Backend]]:
    async with Backend("a") as a, Backend("b") as b:
        port, admin = free_port(), free_port()
        path = tmp_path / "lbproxy.yaml"
        path.write_text(CONFIG.format(admin=admin, port=port, a=a.address, b=b.address))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lbproxy",
            "run",
            "-c",
            str(path),
            "--workers",
            "2",
            "--log-level",
            "warning",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        running = Tree(process, port, admin, path)
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while not await running.ready():
                assert process.returncode is None, "lbproxy exited"
                assert asyncio.get_running_loop().time() < deadline, "not ready after 20 s"
                await asyncio.sleep(0.05)
            yield running, a, b
        finally:
            if process.returncode is None:
                for child in children(process.pid):
                    os.kill(child, signal.SIGKILL)
                process.kill()
                await process.wait()


async def requests_on_new_connections(port: int, count: int) -> list[bytes]:
    return [(await get(port)).body for _ in range(count)]


async def only_a_serves(port: int, b: Backend, seconds: float, what: str) -> None:
    """Wait (at most `seconds`) until a round of requests avoids b, then check that 40 more all go to a."""
    deadline = asyncio.get_running_loop().time() + seconds
    while b"b" in await requests_on_new_connections(port, 10):
        assert asyncio.get_running_loop().time() < deadline, what
    before = len(b.requests)
    bodies = await requests_on_new_connections(port, 40)
    assert set(bodies) == {b"a"}
    assert len(b.requests) == before


async def test_both_workers_serve_and_metrics_are_summed(tree: tuple[Tree, Backend, Backend]) -> None:
    running, a, b = tree
    assert len(children(running.process.pid)) == 2
    bodies = await requests_on_new_connections(running.port, 60)
    assert set(bodies) == {b"a", b"b"}
    metrics = await running.metrics()
    per_worker = [
        metrics["lbproxy_worker_requests_total{worker=0}"],
        metrics["lbproxy_worker_requests_total{worker=1}"],
    ]
    assert sum(per_worker) == 60
    assert min(per_worker) > 0, f"one worker got nothing: {per_worker}"  # SO_REUSEPORT spreads connections
    assert metrics["lbproxy_listener_requests_total{listener=web}"] == 60
    served = metrics["lbproxy_server_connections_total{pool=farm,server=a}"]
    served += metrics["lbproxy_server_connections_total{pool=farm,server=b}"]
    assert served == len(a.requests) + len(b.requests) == 60


async def test_a_drain_through_the_api_reaches_every_worker(tree: tuple[Tree, Backend, Backend]) -> None:
    running, _a, b = tree
    async with aiohttp.ClientSession() as session:
        url = f"{running.admin}/api/v1/pools/farm/servers/b/drain"
        async with session.post(url) as response:
            assert response.status == 200
    # The supervisor pushes state every 0.1 s: wait until a round of requests avoids b on both workers.
    await only_a_serves(running.port, b, 5, "b still gets traffic")
    metrics = await running.metrics()
    assert metrics["lbproxy_worker_requests_total{worker=0}"] > 0
    assert metrics["lbproxy_worker_requests_total{worker=1}"] > 0


async def test_a_reload_reaches_every_worker(tree: tuple[Tree, Backend, Backend]) -> None:
    running, _a, b = tree
    text = running.path.read_text()
    running.path.write_text(text.replace(f'      - {{name: b, address: "{b.address}"}}\n', ""))
    before = await running.metrics()
    running.process.send_signal(signal.SIGHUP)
    await only_a_serves(running.port, b, 10, "b still gets traffic after the reload")
    after = await running.metrics()
    assert after["lbproxy_config_reloads_total{result=success}"] == 1
    for worker in ("0", "1"):  # both workers took part, and both have the new config
        key = f"lbproxy_worker_requests_total{{worker={worker}}}"
        assert after[key] > before[key]


async def test_a_killed_worker_comes_back(tree: tuple[Tree, Backend, Backend]) -> None:
    running, _a, _b = tree
    first = children(running.process.pid)
    os.kill(first[0], signal.SIGKILL)

    async def restarted() -> bool:
        return (await running.metrics()).get("lbproxy_worker_restarts_total{}", 0) == 1

    deadline = asyncio.get_running_loop().time() + 15
    while not await restarted():
        assert asyncio.get_running_loop().time() < deadline, "the worker was not restarted"
        await asyncio.sleep(0.1)
    await eventually(lambda: len(children(running.process.pid)) == 2, timeout=10, what="two workers again")
    assert first[0] not in children(running.process.pid)
    bodies = await requests_on_new_connections(running.port, 20)
    assert len(bodies) == 20


async def test_sigterm_reaches_every_worker(tree: tuple[Tree, Backend, Backend]) -> None:
    running, _a, _b = tree
    workers = children(running.process.pid)
    running.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(running.process.wait(), 45) == 0
    assert not any(alive(pid) for pid in workers)


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
