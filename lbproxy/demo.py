"""The demo behind `make run`: one process per demo back-end, and lbproxy in front of them.

`lbproxy demo` starts one `lbproxy demo-backend NAME HOST:PORT` child per server of its config
(primaries and the DR pool alike), prints `demo: NAME on HOST:PORT, pid N` for each once it listens,
then runs lbproxy in its own process as `lbproxy run` would, and prints three things to try: kill a
back-end and watch it leave, start it again, drain one. Each back-end answers every request with its
name and the Host header and request-target it received, so that `curl` shows the rotation.

Why it is built this way:
- A back-end is a real process so that stopping one is what it is in a farm: `kill PID`, its port
  closed, the health check seeing it go down. Starting it again is one printed command, the one the
  demo ran for it; there is no demo control protocol to learn.
- The children run in a session of their own: Ctrl-C reaches only the demo, which stops lbproxy
  first and its back-ends after, so that the last log lines are not a farm falling over. Each
  back-end is given the demo's PID (`--demo-pid`) and exits when that process is gone: nothing is
  left listening on the demo's ports if the demo is killed, and a back-end started again by hand
  from another terminal (the printed command carries the PID) ends with the demo too.
- A child says that it listens by printing its line on a pipe; the demo waits for that line rather
  than polling a port, and a child that cannot listen (its port taken) ends the demo at once, the
  other children stopped.
It must not be imported by the proxy: only `lbproxy demo` and `lbproxy demo-backend` use it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import uvloop
from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from lbproxy.config import Config
    from lbproxy.runtime import Runtime

    Serve = Callable[[Config, Callable[[Runtime], object]], Awaitable[int]]  # the CLI's lbproxy

START_TIMEOUT = 15.0  # seconds for every back-end to listen (they start side by side)
STOP_TIMEOUT = 5.0  # after SIGTERM, before SIGKILL
WATCH_INTERVAL = 0.5  # how often a back-end looks whether its demo process is still there
DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"  # what `lbproxy ctl` talks to without --admin


# -- one back-end -------------------------------------------------------------------------------


def backend_app(name: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        host = request.headers.get("Host", "")
        body = f"server: {name}\nhost: {host}\ntarget: {request.raw_path}\n"
        return web.Response(text=body, headers={"X-Served-By": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)  # the health probe's /health included
    return app


def ready_line(name: str, address: str, pid: int) -> str:
    return f"demo: {name} on {address}, pid {pid}"


def run_backend(name: str, address: str, demo_pid: int | None) -> int:
    """`lbproxy demo-backend NAME HOST:PORT`: serve until SIGTERM or SIGINT, or until `demo_pid` ends."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        print(f"demo-backend: expected HOST:PORT, got {address!r}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve_backend(name, host.strip("[]"), int(port), address, demo_pid))


async def _serve_backend(name: str, host: str, port: int, address: str, demo_pid: int | None) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    # A short shutdown_timeout: a stopped back-end should look like a server going away, at once.
    runner = web.AppRunner(backend_app(name), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as error:
            print(f"demo: {name}: cannot listen on {address}: {error.strerror}", file=sys.stderr)
            return 1
        print(ready_line(name, address, os.getpid()), flush=True)
        while not stopping.is_set():
            if demo_pid is not None and not _alive(demo_pid):
                break
            try:
                await asyncio.wait_for(stopping.wait(), WATCH_INTERVAL)
            except TimeoutError:
                pass
        return 0
    finally:
        await runner.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # there, but someone else's
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # A zombie has ended and only waits for its parent to reap it (and a killed demo's new
            # parent may take its time): the state is the field after the command's closing bracket.
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: the signal test is all there is


# -- the demo -----------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    address: str
    process: asyncio.subprocess.Process


@dataclass
class Farm:
    """The demo's back-end processes; `stop()` ends those still running, whatever happened before."""

    backends: list[Backend] = field(default_factory=list)
    stopping: bool = False
    _watchers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, loaded: Config, interrupted: asyncio.Event) -> str | None:
        """Start one back-end per server address and wait until each listens; a problem: its text.

        `interrupted` (Ctrl-C) ends the wait: the caller stops what has started.
        """
        servers: dict[str, str] = {}  # address -> name: an address in two pools gets one back-end
        for pool in loaded.pools.values():
            for server in pool.servers:
                servers.setdefault(str(server.address), server.name)
        for address, name in servers.items():
            if interrupted.is_set():
                return "interrupted while the back-ends started"
            process = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "lbproxy"],  # not sys.argv[0]: that may be a path to __main__.py
                *_backend_arguments(name, address),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                start_new_session=True,  # out of the terminal's Ctrl-C: the demo stops it in its turn
            )
            self.backends.append(Backend(name, address, process))
        deadline = time.monotonic() + START_TIMEOUT
        for backend in self.backends:
            assert backend.process.stdout is not None
            reading = asyncio.ensure_future(backend.process.stdout.readline())
            interrupt = asyncio.ensure_future(interrupted.wait())
            timeout = max(0.0, deadline - time.monotonic())
            await asyncio.wait((reading, interrupt), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            interrupt.cancel()
            if not reading.done():
                reading.cancel()
                if interrupted.is_set():
                    return "interrupted while the back-ends started"
                return f"{backend.name} did not start listening on {backend.address} in {START_TIMEOUT:g}s"
            line = reading.result()
            if not line:
                return f"{backend.name} did not start (exit code {await backend.process.wait()})"
            print(line.decode().rstrip("\n"), flush=True)
            watcher = asyncio.get_running_loop().create_task(self._watch(backend))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
        return None

    async def _watch(self, backend: Backend) -> None:
        code = await backend.process.wait()
        if not self.stopping:
            how = f": {signal.Signals(-code).name}" if code < 0 else f", exit code {code}" if code else ""
            print(f"demo: {backend.name} (pid {backend.process.pid}) stopped{how}", flush=True)

    async def stop(self) -> None:
        self.stopping = True
        running = [backend.process for backend in self.backends if backend.process.returncode is None]
        for process in running:
            try:
                process.terminate()
            except ProcessLookupError:
                pass  # it ended since returncode was looked at
        try:
            await asyncio.wait_for(asyncio.gather(*(process.wait() for process in running)), STOP_TIMEOUT)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        for watcher in list(self._watchers):
            await watcher


async def run(loaded: Config, serve: Serve) -> int:
    """`lbproxy demo`: the back-ends, then `serve` (the CLI's lbproxy), then the back-ends stopped."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # while the back-ends start; `serve` then has its own
        loop.add_signal_handler(signum, interrupted.set)
    farm = Farm()
    try:
        problem = await farm.start(loaded, interrupted)
        if problem is not None:
            print(f"demo: {problem}; stopping the demo", file=sys.stderr)
            return 1
        return await serve(loaded, lambda runtime: print(tries(loaded, runtime, farm), flush=True))
    finally:
        await farm.stop()


def tries(loaded: Config, runtime: Runtime, farm: Farm) -> str:
    """The three things to try, printed once lbproxy serves: commands to paste in another terminal."""
    listener = next((listener for listener in loaded.listeners if listener.mode == "http"), loaded.listeners[0])
    pool = loaded.pools[listener.pool]
    server = pool.servers[1 if len(pool.servers) > 1 else 0]
    backend = next(backend for backend in farm.backends if backend.name == server.name)
    web_url = _url(runtime, listener.name)
    admin_url = _url(runtime, "admin") or "(none: the config has no admin block)"
    ctl = _ctl_command(runtime)
    health = pool.health
    lines = [
        "",
        f"Try it from another terminal, in {os.getcwd()}. Watch the status page at {admin_url}",
        f"or run `{ctl} status`; `curl -s {web_url}` says which server answered.",
        f"1. Stop {server.name}: {health.fall} failed probes ({health.interval:g}s apart) and it is out of rotation.",
        f"     kill {backend.process.pid}",
        f"2. Start it again: after {health.rise} good probes it is back.",
        f"     {shlex.join([*_lbproxy(), *_backend_arguments(server.name, backend.address)])} &",
        "3. Drain it (no new requests; those in flight finish), then put it back:",
        f"     {ctl} drain {pool.name} {server.name}",
        f"     {ctl} enable {pool.name} {server.name}",
        "Ctrl-C here stops lbproxy and every demo back-end, one started again by hand too.",
    ]
    return "\n".join(lines)


def _url(runtime: Runtime, name: str) -> str:
    bound = runtime.bound.get(name)
    return f"{bound.scheme}://{bound.host}:{bound.port}/" if bound is not None else ""


def _ctl_command(runtime: Runtime) -> str:
    command = shlex.join([*_lbproxy(), "ctl"])
    admin = _url(runtime, "admin").rstrip("/")
    return command if admin in (DEFAULT_ADMIN_URL, "") else f"{command} --admin {admin}"


def _lbproxy() -> list[str]:
    """lbproxy as the person started the demo: `.venv/bin/lbproxy` (from `make run`), or `python -m lbproxy`."""
    script = sys.argv[0]
    if os.path.basename(script) != "lbproxy":
        return [sys.executable, "-m", "lbproxy"]
    relative = os.path.relpath(script)
    if relative.startswith(".."):
        return [os.path.abspath(script)]
    return [relative if os.sep in relative else os.path.join(".", relative)]


def _backend_arguments(name: str, address: str) -> list[str]:
    return ["demo-backend", name, address, "--demo-pid", str(os.getpid())]
