"""`lbproxy demo` as a newcomer runs it: real processes, the commands it prints, run as printed.

The demo starts from a copy of config/demo.yaml whose 127.0.0.1 ports are replaced by free ones, with
the working directory at the repository's root as `make run` has it. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import LOCALHOST, free_ports, get

REPO = Path(__file__).resolve().parent.parent
LBPROXY = Path(sys.executable).with_name("lbproxy")  # the venv's script, as `make run` runs it
SHOWN = os.path.relpath(LBPROXY, REPO)  # how the demo shows it: `.venv/bin/lbproxy`
READY = re.compile(r"demo: (\S+) on (\S+), pid (\d+)")
FARM = ["srvappout1", "srvappout2", "srvappout3", "srvappout4"]
DR = ["srvdrout1", "srvdrout2"]
LAST_LINE = "Ctrl-C here stops lbproxy and every demo back-end, one started again by hand too."


@dataclass
class Demo:
    process: asyncio.subprocess.Process
    log: Path
    lines: list[str] = field(default_factory=list)
    backends: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (address, pid)
    ports: dict[int, int] = field(default_factory=dict)  # demo.yaml's port -> the test's

    @property
    def web(self) -> int:
        return self.ports[8080]

    @property
    def admin(self) -> int:
        return self.ports[9090]

    def command(self, *words: str) -> list[str]:
        """The printed command line holding every word of `words`, split as a shell would."""
        found = [line for line in self.lines if all(word in line.split() for word in words)]
        assert len(found) == 1, f"one printed line with {words}, got {found} in:\n" + "\n".join(self.lines)
        command = shlex.split(found[0])
        return command[:-1] if command[-1] == "&" else command

    async def read_until(self, last: str, timeout: float) -> None:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while not self.lines or self.lines[-1] != last:
                line = await self.process.stdout.readline()
                assert line, f"the demo ended (exit code {await self.process.wait()}):\n{self.output()}"
                self.lines.append(line.decode().rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + self.log.read_text()


def demo_config(directory: Path) -> tuple[Path, dict[int, int]]:
    """config/demo.yaml with a free port for each of its ports, and its maintenance page beside it."""
    text = (REPO / "config" / "demo.yaml").read_text()
    written = sorted({int(port) for port in re.findall(rf"{LOCALHOST}:(\d+)", text)})
    ports = dict(zip(written, free_ports(len(written)), strict=True))
    text = re.sub(rf"{LOCALHOST}:(\d+)", lambda match: f"{LOCALHOST}:{ports[int(match[1])]}", text)
    path = directory / "demo.yaml"
    path.write_text(text)
    shutil.copy(REPO / "config" / "maintenance.html", directory / "maintenance.html")
    return path, ports


@contextlib.asynccontextmanager
async def demo(path: Path, ports: dict[int, int]) -> AsyncIterator[Demo]:
    """`lbproxy demo -c path` started; on the way out what it left running is killed (the test says if it did)."""
    log = path.with_name("demo.log")
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            str(LBPROXY), "demo", "-c", str(path), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr
        )
    running = Demo(process, log, ports=ports)
    try:
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for _, pid in running.backends.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended: it only waits to be reaped


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def server_states(running: Demo) -> dict[str, dict[str, object]]:
    response = await get(running.admin, b"/api/v1/pools")
    assert response.status == 200
    pools = json.loads(response.body)["pools"]
    return {server["name"]: server for pool in pools for server in pool["servers"]}


async def served_by(running: Demo) -> str:
    """One request through lbproxy: the name of the back-end that answered (it must be a 200)."""
    response = await get(running.web)
    assert response.status == 200, response
    name = response.header(b"X-Served-By")
    assert name is not None
    return name.decode()


async def run(command: list[str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, f"{shlex.join(command)}: exit code {process.returncode}\n{out.decode()}"
    return out.decode()


async def test_the_demo_shows_a_server_leave_and_come_back(tmp_path: Path) -> None:
    async with demo(*demo_config(tmp_path)) as running:
        await running.read_until(LAST_LINE, timeout=30)
        for line in running.lines:
            if match := READY.fullmatch(line):
                running.backends[match[1]] = (match[2], int(match[3]))
        assert sorted(running.backends) == sorted(FARM + DR), running.output()
        assert all(alive(pid) for _, pid in running.backends.values())
        assert {address for address, _ in running.backends.values()} == {
            f"{LOCALHOST}:{port}" for original, port in running.ports.items() if original not in (8080, 9090)
        }
        address, pid = running.backends["srvappout2"]
        admin = f"http://{LOCALHOST}:{running.admin}"
        # The three things to try, as the newcomer reads them.
        assert running.command("kill") == ["kill", str(pid)]
        restart = running.command("demo-backend", "srvappout2")
        assert restart == [
            SHOWN, "demo-backend", "srvappout2", address, "--demo-pid", str(running.process.pid)
        ]  # fmt: skip
        assert f"     {shlex.join(restart)} &" in running.lines
        drain = running.command("drain", "farm", "srvappout2")
        enable = running.command("enable", "farm", "srvappout2")
        assert drain == [SHOWN, "ctl", "--admin", admin, "drain", "farm", "srvappout2"]
        assert enable == [SHOWN, "ctl", "--admin", admin, "enable", "farm", "srvappout2"]
        assert any(f"{SHOWN} ctl --admin {admin} status" in line for line in running.lines)

        # Requests rotate over the four primaries; the DR site waits.
        assert {await served_by(running) for _ in range(8)} == set(FARM)

        # 1. kill PID: the probes take srvappout2 out; no request fails meanwhile (retries).
        os.kill(pid, signal.SIGTERM)

        async def down() -> bool:
            await served_by(running)
            return (await server_states(running))["srvappout2"]["state"] == "down"

        await until(down, timeout=15, what="srvappout2 down in the admin API")
        assert {await served_by(running) for _ in range(12)} == set(FARM) - {"srvappout2"}

        # 2. The printed command starts it again; two good probes bring it back.
        restarted = await asyncio.create_subprocess_exec(
            *restart, cwd=REPO, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
        )
        assert restarted.stdout is not None
        line = await asyncio.wait_for(restarted.stdout.readline(), 30)
        assert line.decode() == f"demo: srvappout2 on {address}, pid {restarted.pid}\n"
        running.backends["srvappout2 (again)"] = (address, restarted.pid)

        async def up() -> bool:
            return (await server_states(running))["srvappout2"]["state"] == "up"

        await until(up, timeout=15, what="srvappout2 up again in the admin API")
        assert {await served_by(running) for _ in range(8)} == set(FARM)

        # 3. Drain it, then enable it, with the printed ctl commands.
        await run(drain)
        assert (await server_states(running))["srvappout2"]["admin"] == "draining"
        assert {await served_by(running) for _ in range(12)} == set(FARM) - {"srvappout2"}
        await run(enable)
        assert (await server_states(running))["srvappout2"]["admin"] == "enabled"
        assert {await served_by(running) for _ in range(8)} == set(FARM)

        # Ctrl-C: lbproxy stops, and every back-end with it, the one started by hand too.
        running.process.send_signal(signal.SIGINT)
        await asyncio.wait_for(running.process.wait(), 45)
        assert running.process.returncode == 0, running.output()
        await asyncio.wait_for(restarted.wait(), 10)
        for name, (_, backend_pid) in running.backends.items():
            assert not alive(backend_pid), f"{name} (pid {backend_pid}) outlived the demo"
        assert running.process.stdout is not None
        rest = (await asyncio.wait_for(running.process.stdout.read(), 10)).decode()
        assert f"demo: srvappout2 (pid {pid}) stopped" in rest.splitlines()


async def test_no_back_end_outlives_a_demo_whose_lbproxy_cannot_start(tmp_path: Path) -> None:
    path, ports = demo_config(tmp_path)
    with socket_on(ports[8080]):  # lbproxy cannot bind its web listener
        async with demo(path, ports) as running:
            assert running.process.stdout is not None
            out = (await asyncio.wait_for(running.process.stdout.read(), 30)).decode()
            assert await asyncio.wait_for(running.process.wait(), 30) == 1
            for match in READY.finditer(out):
                running.backends[match[1]] = (match[2], int(match[3]))
            assert sorted(running.backends) == sorted(FARM + DR), running.output()
            for name, (_, pid) in running.backends.items():
                assert not alive(pid), f"{name} (pid {pid}) outlived the demo"


async def test_a_back_end_that_cannot_listen_stops_the_demo(tmp_path: Path) -> None:
    path, ports = demo_config(tmp_path)
    with socket_on(ports[9103]):
        async with demo(path, ports) as running:
            assert running.process.stdout is not None
            out = (await asyncio.wait_for(running.process.stdout.read(), 30)).decode()
            assert await asyncio.wait_for(running.process.wait(), 30) == 1
            for match in READY.finditer(out):
                running.backends[match[1]] = (match[2], int(match[3]))
            errors = running.log.read_text()
            assert f"demo: srvappout3: cannot listen on {LOCALHOST}:{ports[9103]}" in errors
            assert "demo: srvappout3 did not start (exit code 1); stopping the demo" in errors
            # Those before srvappout3 were announced; the others had started too, unannounced.
            assert running.backends, running.output()
            assert not any(alive(pid) for _, pid in running.backends.values())
            for original in (9101, 9102, 9104, 9201, 9202):
                assert not listening(ports[original])


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOCALHOST, port)) == 0


@contextlib.contextmanager
def socket_on(port: int) -> Iterator[None]:
    """Something else listening on `port` while the block runs."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, port))
        sock.listen()
        yield
