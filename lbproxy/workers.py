"""All the cores: a supervisor process and N worker processes sharing each listening port.

`lbproxy run --workers N` starts a supervisor that runs the health probes, the admin server and the
state file (a `Runtime` with manage=True, serve=False), and N workers that each bind every listener
with SO_REUSEPORT and carry the traffic (serve=True, manage=False). They talk over each worker's
stdin and stdout, one JSON object a line:

- supervisor -> worker: `{"state": {"pool/server": [up, admin, weight]}}` whenever a server's health,
  admin state or weight changes (checked every 0.1 s), `{"stats": id}` at scrape time, `{"reload": 1}`;
- worker -> supervisor: `{"ready": pid}` once bound, `{"stats": id, ...}` counters,
  `{"down": "pool/server", "reason": ...}` when its passive detection takes a server out.

The supervisor sums the workers' counters into its own (idle) server objects before every read of
/metrics or the API, restarts a worker that dies (counted), and passes SIGHUP and SIGTERM on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from lbproxy import config, metrics
from lbproxy.http_proxy import DURATION_BOUNDS, HttpListener
from lbproxy.pool import AdminState, Pool, Server
from lbproxy.runtime import Runtime, StartError

log = logging.getLogger("lbproxy.workers")

PUSH_EVERY = 0.1  # seconds between checks for state to push to the workers
STATS_TIMEOUT = 2.0


def _key(pool: Pool, server: Server) -> str:
    return f"{pool.name}/{server.name}"


def _state(runtime: Runtime) -> dict[str, list[Any]]:
    return {
        _key(pool, server): [server.up, server.admin.value, server.weight]
        for pool in runtime.pools.values()
        for server in pool.servers
    }


# -- the worker side --


def _stats(runtime: Runtime) -> dict[str, Any]:
    servers = {
        _key(pool, server): [
            server.requests,
            server.inflight,
            server.responses,
            server.connect_failures,
            server.failures,
            server.sent_bytes,
            server.received_bytes,
        ]
        for pool in runtime.pools.values()
        for server in pool.servers
    }
    listeners: dict[str, Any] = {}
    for name, listener in runtime.listeners.items():
        numbers: dict[str, Any] = {
            "mode": "http" if isinstance(listener, HttpListener) else "tcp",
            "pool": listener.pool.name,
            "active": len(listener.connections),
            "connections_total": listener.connections_total,
            "rejected": listener.rejected,
            "retries": listener.retries,
            "bad_proxy_headers": listener.bad_proxy_headers,
        }
        if isinstance(listener, HttpListener):
            numbers.update(
                requests=listener.requests,
                responses=listener.responses,
                errors=listener.errors,
                durations=listener.durations,
                duration_sum=listener.duration_sum,
            )
        listeners[name] = numbers
    pools = {name: pool.retried for name, pool in runtime.pools.items()}
    return {"servers": servers, "listeners": listeners, "pools": pools}


async def run_worker(path: str) -> int:
    """A worker process: serve the listeners, follow the supervisor's state, report counters."""
    loop = asyncio.get_running_loop()
    runtime = Runtime(config.load(path), serve=True, manage=False)
    try:
        await runtime.start()
    except StartError as error:
        log.error("worker %d: %s", os.getpid(), error)
        return 1
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    def send(message: dict[str, Any]) -> None:
        writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def watch(pools: dict[str, Pool]) -> None:
        for pool in pools.values():
            pool.slow_start = None  # the supervisor ramps the weights and pushes them
            pool.on_down = lambda server, reason, pool=pool: send({"down": _key(pool, server), "reason": reason})

    watch(runtime.pools)
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # Ctrl-C reaches the supervisor, which decides
    send({"ready": os.getpid()})
    reading = loop.create_task(reader.readline())
    waiting = loop.create_task(stopping.wait())
    while True:
        done, _ = await asyncio.wait({reading, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if waiting in done:
            break
        line = reading.result()
        if not line:
            break  # the supervisor is gone
        reading = loop.create_task(reader.readline())
        message = json.loads(line)
        if "state" in message:
            _apply(runtime, message["state"])
        elif "stats" in message:
            send({"stats": message["stats"], **_stats(runtime)})
        elif "cut" in message:
            pool_name, _, server_name = message["cut"].partition("/")
            pool = runtime.pools.get(pool_name)
            server = pool.by_name.get(server_name) if pool is not None else None
            if server is not None:
                for listener in runtime.listeners.values():
                    listener.cut_server(server)
        elif "reload" in message:
            await runtime.reload()
            watch(runtime.pools)
    reading.cancel()
    waiting.cancel()
    await runtime.shutdown(runtime.config.shutdown_timeout)
    writer.close()
    return 0


def _apply(runtime: Runtime, state: dict[str, list[Any]]) -> None:
    for key, (up, admin, weight) in state.items():
        pool_name, _, server_name = key.partition("/")
        pool = runtime.pools.get(pool_name)
        server = pool.by_name.get(server_name) if pool is not None else None
        if pool is None or server is None:
            continue
        if server.admin.value != admin:
            pool.set_admin(server, AdminState(admin))
        if server.up != up:
            pool.set_health(server, up, "the supervisor's probes", force=True)
        pool.follow_weight(server, weight)


# -- the supervisor side --


class ListenerTotals:
    """One listener's counters summed over the workers: what metrics and the API read."""

    def __init__(self, name: str, numbers: dict[str, Any]) -> None:
        self.name = name
        self.mode = numbers["mode"]
        self.pool_name = numbers["pool"]
        self.active_connections = 0
        self.connections_total = 0
        self.rejected = 0
        self.retries = 0
        self.bad_proxy_headers = 0
        self.requests = 0
        self.responses = [0] * 6
        self.errors: dict[int, int] = {}
        self.durations = [0] * (len(DURATION_BOUNDS) + 1)
        self.duration_sum = 0.0

    def add(self, numbers: dict[str, Any]) -> None:
        self.active_connections += numbers["active"]
        self.connections_total += numbers["connections_total"]
        self.rejected += numbers["rejected"]
        self.retries += numbers["retries"]
        self.bad_proxy_headers += numbers["bad_proxy_headers"]
        if self.mode == "http":
            self.requests += numbers["requests"]
            self.responses = [a + b for a, b in zip(self.responses, numbers["responses"], strict=True)]
            for status, count in numbers["errors"].items():
                self.errors[int(status)] = self.errors.get(int(status), 0) + count
            self.durations = [a + b for a, b in zip(self.durations, numbers["durations"], strict=True)]
            self.duration_sum += numbers["duration_sum"]

    def state(self) -> dict[str, object]:
        counters: dict[str, object] = {
            "connections": self.connections_total,
            "rejected": self.rejected,
            "retries": self.retries,
            "bad_proxy_headers": self.bad_proxy_headers,
        }
        if self.mode == "http":
            counters.update(
                requests=self.requests,
                responses={f"{n}xx": self.responses[n] for n in range(1, 6)},
                errors={str(status): count for status, count in sorted(self.errors.items())},
            )
        return {
            "mode": self.mode,
            "pool": self.pool_name,
            "active_connections": self.active_connections,
            "counters": counters,
        }


class Worker:
    """One worker process, as the supervisor sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.requests = 0  # from its last stats

    def send(self, message: dict[str, Any]) -> None:
        process = self.process
        if process is not None and process.stdin is not None and process.returncode is None:
            try:
                process.stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
            except (ConnectionError, RuntimeError):
                pass  # it is dying; the supervisor restarts it


class Supervisor:
    """Runs the workers and the managing runtime; see the module docstring."""

    def __init__(self, path: str, loaded: config.Config, count: int) -> None:
        self.path = path
        self.runtime = Runtime(loaded, serve=False, manage=True)
        self.runtime.refresh_hook = self.collect
        self.runtime.cut_hook = self._cut
        self.runtime.registry = metrics.registry(self)  # /metrics reads the sums, through this view
        self.runtime.workers_ready = False
        self.workers = [Worker(index) for index in range(count)]
        self.restarts = 0
        self.stopping = False
        self.totals: dict[str, ListenerTotals] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stats_id = 0
        self._pushed: dict[str, list[Any]] = {}

    async def start(self) -> None:
        await self.runtime.start()
        for worker in self.workers:
            await self._spawn(worker)
        self._spawn_task(self._push_state())

    def _spawn_task(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, worker: Worker) -> None:
        worker.ready = False
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lbproxy",
            "worker",
            "-c",
            self.path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker.send({"state": _state(self.runtime)})
        self._spawn_task(self._read(worker, worker.process))

    async def _read(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "ready" in message:
                worker.ready = True
                self.runtime.workers_ready = all(w.ready for w in self.workers)
                log.info("worker %d (pid %d) ready", worker.index, message["ready"])
            elif "stats" in message:
                future = worker.pending.pop(message["stats"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif "down" in message:
                self._passive_down(message["down"], message.get("reason", ""))
        code = await process.wait()
        for future in worker.pending.values():
            future.cancel()
        worker.pending.clear()
        if not self.stopping:
            self.restarts += 1
            log.error("worker %d (pid %d) exited with %s: restarting it", worker.index, process.pid, code)
            self.runtime.workers_ready = False
            await self._spawn(worker)

    def _cut(self, server: Server) -> None:
        """A disabled server's grace is over: every worker cuts its connections to it."""
        for worker in self.workers:
            worker.send({"cut": _key(server.pool, server)})

    def _passive_down(self, key: str, reason: str) -> None:
        pool_name, _, server_name = key.partition("/")
        pool = self.runtime.pools.get(pool_name)
        server = pool.by_name.get(server_name) if pool is not None else None
        if pool is not None and server is not None and server.up:
            pool.set_health(server, False, reason)

    async def _push_state(self) -> None:
        while True:
            state = _state(self.runtime)
            if state != self._pushed:
                self._pushed = state
                for worker in self.workers:
                    worker.send({"state": state})
            await asyncio.sleep(PUSH_EVERY)

    async def collect(self) -> None:
        """Sum every worker's counters into the supervisor's servers, pools and listener totals."""
        loop = asyncio.get_running_loop()
        self._stats_id += 1
        futures = []
        for worker in self.workers:
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            worker.pending[self._stats_id] = future
            worker.send({"stats": self._stats_id})
            futures.append((worker, future))
        replies = []
        for worker, future in futures:
            try:
                replies.append((worker, await asyncio.wait_for(future, STATS_TIMEOUT)))
            except (TimeoutError, asyncio.CancelledError):
                worker.pending.pop(self._stats_id, None)
        servers: dict[str, list[Any]] = {}
        totals: dict[str, ListenerTotals] = {}
        retried: dict[str, int] = {}
        for worker, reply in replies:
            worker.requests = sum(numbers.get("requests", 0) for numbers in reply["listeners"].values())
            for key, numbers in reply["servers"].items():
                servers.setdefault(key, []).append(numbers)
            for name, numbers in reply["listeners"].items():
                totals.setdefault(name, ListenerTotals(name, numbers)).add(numbers)
            for name, count in reply["pools"].items():
                retried[name] = retried.get(name, 0) + count
        for pool in self.runtime.pools.values():
            pool.retried = retried.get(pool.name, pool.retried)
            for server in pool.servers:
                rows = servers.get(_key(pool, server))
                if not rows:
                    continue
                server.requests = sum(row[0] for row in rows)
                server.inflight = sum(row[1] for row in rows)
                server.responses = [sum(row[2][n] for row in rows) for n in range(6)]
                server.connect_failures = sum(row[3] for row in rows)
                server.failures = sum(row[4] for row in rows)
                server.sent_bytes = sum(row[5] for row in rows)
                server.received_bytes = sum(row[6] for row in rows)
        self.totals = totals
        self.runtime.listener_totals = totals

    # What metrics read (metrics.Source), summed over the workers by collect().

    @property
    def pools(self) -> dict[str, Pool]:
        return self.runtime.pools

    @property
    def listeners(self) -> dict[str, ListenerTotals]:
        return self.totals

    @property
    def reloads(self) -> dict[str, int]:
        return self.runtime.reloads

    @property
    def last_reload_ok(self) -> bool:
        return self.runtime.last_reload_ok

    @property
    def worker_requests(self) -> dict[str, int]:
        return {str(worker.index): worker.requests for worker in self.workers}

    @property
    def worker_restarts(self) -> int:
        return self.restarts

    async def reload(self) -> list[str]:
        problems = await self.runtime.reload()
        if not problems:
            for worker in self.workers:
                worker.send({"reload": 1})
        return problems

    async def shutdown(self) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        timeout = self.runtime.config.shutdown_timeout + 5
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                await asyncio.wait_for(worker.process.wait(), timeout)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
        for task in list(self._tasks):
            task.cancel()
        await self.runtime.stop()
