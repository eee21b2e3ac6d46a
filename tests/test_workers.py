"""`lbproxy run --workers 2` as a real process tree: both workers serve, the supervisor's state, drains and
reloads (from SIGHUP, the API or `ctl`) reach them, a reload any worker refuses is refused, metrics are
summed over them and never go down, a worker that dies comes back on the running config (backing off if
it keeps dying), thousands of servers cross to the workers, and their access log reaches standard output.

Each test runs the real command on 127.0.0.1 and real back-ends; every wait has a deadline, and no
process is left behind (the supervisor is stopped, its workers killed, then it is killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import LOCALHOST, Backend, ctl, eventually, free_ports, get

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

WRITE = {"X-Lbproxy-Admin": "1"}  # what the admin API wants of a write without a token, on loopback


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

    async def restarts(self) -> float:
        return (await self.metrics()).get("lbproxy_worker_restarts_total{}", 0)

    async def post(self, path: str) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.post(f"{self.admin}{path}", headers=WRITE) as response:
            return response.status, await response.json()

    async def until(self, check: Any, seconds: float, what: str) -> None:
        """Wait (at most `seconds`) until the coroutine function `check` returns true."""
        deadline = time.monotonic() + seconds
        while not await check():
            assert self.process.returncode is None, "lbproxy exited"
            assert time.monotonic() < deadline, f"timed out after {seconds}s waiting for {what}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def lbproxy_tree(
    path: Path,
    port: int,
    admin: int,
    stdout: IO[bytes] | int = asyncio.subprocess.DEVNULL,
    stderr: IO[bytes] | int = asyncio.subprocess.DEVNULL,
) -> AsyncIterator[Tree]:
    """`lbproxy run --workers 2 -c path`, ready; killed with its workers at the end if it still runs."""
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
        stdout=stdout,
        stderr=stderr,
    )
    running = Tree(process, port, admin, path)
    try:
        await running.until(running.ready, 20, "lbproxy to be ready")
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGSTOP)  # it starts no worker while we kill them
            for child in children(process.pid):
                os.kill(child, signal.SIGKILL)
            process.kill()
            await process.wait()


@pytest.fixture
async def tree(tmp_path: Path) -> AsyncIterator[tuple[Tree, Backend, Backend]]:
    async with Backend("a") as a, Backend("b") as b:
        port, admin = free_ports(2)
        path = tmp_path / "lbproxy.yaml"
        path.write_text(CONFIG.format(admin=admin, port=port, a=a.address, b=b.address))
        async with lbproxy_tree(path, port, admin) as running:
            yield running, a, b


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


async def kill_a_worker(running: Tree) -> int:
    """SIGKILL one worker; wait until the supervisor has counted it and two workers run again."""
    before = await running.restarts()
    victim = children(running.process.pid)[0]
    os.kill(victim, signal.SIGKILL)

    async def counted() -> bool:
        return await running.restarts() == before + 1

    await running.until(counted, 15, "the supervisor to count the dead worker")
    await eventually(lambda: len(children(running.process.pid)) == 2, timeout=10, what="two workers again")
    return victim


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
    status, _ = await running.post("/api/v1/pools/farm/servers/b/drain")
    assert status == 200
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


# #14, defect 10: the API's and ctl's reload reloaded the supervisor only: 200, the API showed the new
# servers, and the traffic went on to the old ones.


async def test_a_reload_through_the_api_or_ctl_is_in_force_in_every_worker_when_it_answers(
    tree: tuple[Tree, Backend, Backend],
) -> None:
    running, _a, b = tree
    text = running.path.read_text()
    running.path.write_text(text.replace(f'      - {{name: b, address: "{b.address}"}}\n', ""))
    assert await running.post("/api/v1/reload") == (200, {"result": "reloaded"})
    before = len(b.requests)
    assert set(await requests_on_new_connections(running.port, 40)) == {b"a"}  # at once: no waiting
    assert len(b.requests) == before
    running.path.write_text(text)
    code, _out, err = await ctl("--admin", running.admin, "reload")
    assert code == 0, err
    assert set(await requests_on_new_connections(running.port, 40)) == {b"a", b"b"}
    metrics = await running.metrics()
    assert metrics["lbproxy_config_reloads_total{result=success}"] == 2


# #14, defect 10: a reload every worker refused (here: a new listener's port is taken) was counted a
# success, and the supervisor went on with the new config.


async def test_a_reload_the_workers_refuse_is_refused(tree: tuple[Tree, Backend, Backend]) -> None:
    running, _a, _b = tree
    text = running.path.read_text()
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))  # no SO_REUSEPORT: the workers cannot share it
        taken.listen()
        extra = taken.getsockname()[1]
        running.path.write_text(
            text.replace("pools:\n", f'  - name: extra\n    bind: "127.0.0.1:{extra}"\n    pool: farm\npools:\n')
        )
        status, body = await running.post("/api/v1/reload")
        assert status == 400, body
        assert any("workers 0, 1" in problem and "cannot bind" in problem for problem in body["problems"]), body
        metrics = await running.metrics()
        assert metrics["lbproxy_config_reloads_total{result=failure}"] == 1
        assert metrics["lbproxy_config_reloads_total{result=success}"] == 0
        assert metrics["lbproxy_config_last_reload_successful{}"] == 0
        async with aiohttp.ClientSession() as session, session.get(f"{running.admin}/api/v1/listeners") as response:
            assert [listener["name"] for listener in (await response.json())["listeners"]] == ["web"]
        assert set(await requests_on_new_connections(running.port, 20)) == {b"a", b"b"}
    # The port is free now: the same file reloads, and the new listener serves in every worker.
    assert await running.post("/api/v1/reload") == (200, {"result": "reloaded"})
    assert (await running.metrics())["lbproxy_config_last_reload_successful{}"] == 1
    assert set(await requests_on_new_connections(extra, 20)) == {b"a", b"b"}


# #14, defect 10: the counters went backwards when a worker died (110 -> 42).


async def test_no_counter_goes_down_when_a_worker_dies(tree: tuple[Tree, Backend, Backend]) -> None:
    running, _a, _b = tree
    await requests_on_new_connections(running.port, 60)
    before = await running.metrics()
    assert before["lbproxy_listener_requests_total{listener=web}"] == 60
    await kill_a_worker(running)
    after = await running.metrics()
    counters = [key for key, value in before.items() if key.startswith(("lbproxy_server_", "lbproxy_listener_"))]
    for key in counters:
        if "_total{" in key or "_bucket{" in key or "_count{" in key:
            assert after[key] >= before[key], f"{key} went from {before[key]} down to {after[key]}"
    assert after["lbproxy_listener_requests_total{listener=web}"] == 60
    for worker in ("0", "1"):
        key = f"lbproxy_worker_requests_total{{worker={worker}}}"
        assert after[key] >= before[key]
    await requests_on_new_connections(running.port, 20)
    assert (await running.metrics())["lbproxy_listener_requests_total{listener=web}"] == 80


# #14, defect 10: a restarted worker re-read the file: an invalid one on disk (no reload asked) made it
# crash in a loop, with no backoff (14 restarts in 5 s), and /readyz answered 503.


async def test_a_restarted_worker_runs_the_running_config_not_the_file(tree: tuple[Tree, Backend, Backend]) -> None:
    running, _a, _b = tree
    running.path.write_text("listeners: [\n")  # broken, and not reloaded: the running config stays
    await kill_a_worker(running)
    await running.until(running.ready, 10, "/readyz to answer 200 again")
    assert set(await requests_on_new_connections(running.port, 40)) == {b"a", b"b"}
    assert await running.restarts() == 1  # the new worker runs: it was started once


async def test_a_worker_that_keeps_dying_is_restarted_with_a_growing_delay(tmp_path: Path) -> None:
    # The maintenance page is read when a worker builds its listeners: gone, every new worker dies.
    page = tmp_path / "maintenance.html"
    page.write_text("<p>back soon</p>\n")
    log = tmp_path / "stderr"
    async with Backend("a") as a, Backend("b") as b:
        port, admin = free_ports(2)
        path = tmp_path / "lbproxy.yaml"
        path.write_text(
            CONFIG.format(admin=admin, port=port, a=a.address, b=b.address).replace(
                "    pool: farm\n", f"    pool: farm\n    maintenance_page: {page}\n"
            )
        )
        with log.open("wb") as stderr:
            async with lbproxy_tree(path, port, admin, stderr=stderr) as running:
                page.unlink()
                os.kill(children(running.process.pid)[0], signal.SIGKILL)

                async def four_restarts() -> bool:
                    return await running.restarts() >= 4

                await running.until(four_restarts, 15, "four restarts")
                assert not await running.ready()
                # The supervisor's own clock, in its log: at once after a worker that ran, then 0.5 s, 1 s,
                # 2 s... plus the time the new worker takes to fail (no backoff: one every 0.15 s).
                deaths = [
                    datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    for line in log.read_text().splitlines()
                    if "exited with" in line
                ]
                assert len(deaths) >= 4, deaths
                assert deaths[2] - deaths[1] >= 0.5, deaths
                assert deaths[3] - deaths[2] >= 1.0, deaths
                assert "restarting it in 1s" in log.read_text()
                page.write_text("<p>back soon</p>\n")
                await running.until(running.ready, 10, "the worker to start again once it can")
                assert set(await requests_on_new_connections(running.port, 20)) == {b"a", b"b"}


# #14, defect 10: the supervisor-worker pipe carried one JSON object a line, under asyncio's 64 KiB limit
# on a line: at 1,600 servers the workers crashed in a loop.


async def test_thousands_of_servers_cross_to_the_workers(tmp_path: Path) -> None:
    async with Backend("a") as a:
        port, admin = free_ports(2)
        servers = "".join(f'      - {{name: s{n}, address: "{a.address}"}}\n' for n in range(2000))
        path = tmp_path / "lbproxy.yaml"
        path.write_text(
            f'admin:\n  bind: "127.0.0.1:{admin}"\n'
            f'listeners:\n  - name: web\n    bind: "127.0.0.1:{port}"\n    pool: farm\n'
            f"pools:\n  farm:\n    servers:\n{servers}"
        )
        async with lbproxy_tree(path, port, admin) as running:
            assert set(await requests_on_new_connections(running.port, 20)) == {b"a"}
            status, _ = await running.post("/api/v1/pools/farm/servers/s1999/drain")
            assert status == 200
            metrics = await running.metrics()
            assert metrics["lbproxy_listener_requests_total{listener=web}"] == 20
            assert metrics["lbproxy_worker_restarts_total{}"] == 0
            assert len(children(running.process.pid)) == 2


# #14, defect 10: with `access_log: "-"`, the workers wrote their access log into the pipe to the
# supervisor, which dropped every line.


async def test_the_workers_access_log_reaches_standard_output(tmp_path: Path) -> None:
    out = tmp_path / "stdout"
    async with Backend("a") as a, Backend("b") as b:
        port, admin = free_ports(2)
        path = tmp_path / "lbproxy.yaml"
        path.write_text(
            CONFIG.format(admin=admin, port=port, a=a.address, b=b.address).replace(
                "    pool: farm\n", '    pool: farm\n    access_log: "-"\n'
            )
        )
        with out.open("wb") as stdout:
            async with lbproxy_tree(path, port, admin, stdout=stdout) as running:
                await requests_on_new_connections(running.port, 20)

                def logged() -> list[dict[str, Any]]:
                    lines = out.read_text().splitlines()
                    return [json.loads(line) for line in lines if line.startswith("{")]

                await eventually(lambda: len(logged()) >= 20, timeout=5, what="20 access log lines")
                entries = logged()
                assert len(entries) == 20
                assert {entry["server"] for entry in entries} == {"a", "b"}
                assert {entry["status"] for entry in entries} == {200}


# #14, also looked into: a worker could keep a server down that the supervisor's depool guard kept up.
# Here the file on disk lost its guard (not reloaded); the restarted worker read it, took b down on its
# own, the supervisor refused, and nothing told the worker: once b was back and a died, its requests
# failed. A worker now runs the supervisor's config, and every down it reports is answered with the
# supervisor's state.


async def test_a_worker_follows_the_depool_guard_of_the_running_config(tmp_path: Path) -> None:
    async with Backend("a") as a, Backend("b") as b:
        port, admin = free_ports(2)
        path = tmp_path / "lbproxy.yaml"
        guarded = CONFIG.format(admin=admin, port=port, a=a.address, b=b.address) + (
            "    health: {type: tcp, interval: 200ms}\n"
            "    passive: {consecutive_failures: 1}\n"
            "    max_down_fraction: 0.4\n"
        )
        path.write_text(guarded)
        async with lbproxy_tree(path, port, admin) as running:
            path.write_text(guarded.replace("    max_down_fraction: 0.4\n", ""))  # not reloaded
            await kill_a_worker(running)
            await running.until(running.ready, 10, "the new worker to be ready")
            await b.stop()
            # Each worker sees b fail; the guard keeps it up (one of two down is more than 40%).
            for _ in range(20):
                assert (await get(running.port)).status == 200
            await b.start(b.port)
            await a.stop()
            # a fails now, and the guard keeps it up too: every request is retried on b.
            bodies = [(response.status, response.body) for response in [await get(running.port) for _ in range(30)]]
            assert set(bodies) == {(200, b"b")}
            api = await running.metrics()
            assert api["lbproxy_server_up{pool=farm,server=a}"] == 1
            assert api["lbproxy_server_up{pool=farm,server=b}"] == 1


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
