"""All the cores: a supervisor process and N worker processes sharing each listening port.

`lbproxy run --workers N` starts a supervisor that owns the control plane (a `Runtime` with manage=True,
serve=False: the controller, the probes, the admin server, the state file) and N workers that each bind
every listener with SO_REUSEPORT and carry the traffic (serve=True, manage=False). A worker never reads
the config file: it is handed the supervisor's running config, already checked and its names resolved,
and follows the controller's versioned snapshots (`control.Snapshot.as_message()`).

They talk over a socket pair, one per worker (the worker's end is its descriptor `--channel FD`; its
standard output and error stay its own, shared with the supervisor's, for logs and `access_log: "-"`).
Each message is a frame: a 4-byte big-endian length, then that many bytes, so no size limit applies (a
config of thousands of servers is one frame). What the supervisor sends is pickle, so that the frozen
`Config` crosses as it is; the worker unpickles it safely, as only its parent holds the other end, and
the parent has its way with the child anyway. What a worker sends is JSON: it is plain data, and a
worker that traffic managed to subvert must not run code in the supervisor by way of a pickle.

- supervisor -> worker: `{"start": config, "hosts": {...}, "state": snapshot}` first of all;
  `{"state": snapshot}` whenever the snapshot differs from the last one sent (checked every 0.1 s), and
  to a worker in answer to each `down` it reports; a reload as `{"prepare": n, "config": ..., "hosts":
  ...}`, then `{"commit": n, "state": snapshot}` or `{"abandon": n}`; `{"stats": id}` at scrape time;
  `{"cut": "pool/server"}` when a disabled server's grace is over.
- worker -> supervisor: `{"ready": pid}` once bound; `{"prepared": n}` (built and bound, not accepting)
  or `{"refused": n, "problems": [...]}`, then `{"committed": n}`; `{"stats": id, ...}` counters;
  `{"down": "pool/server", "reason": ...}` when its passive detection takes a server out.

A reload is the supervisor's controller's, with every running worker as part of its building phase: the
reload commits only if every worker that answers has built and bound it, and then the supervisor's
commit tells them to commit too; otherwise it is refused everywhere (counted as a failure), and nothing
changed anywhere. The supervisor sums the workers' counters into its own (idle) server objects before
every read of /metrics or the API (and every few seconds), keeping the last numbers of a worker that died
so that no total ever goes down; it starts a worker that dies again (at once the first time, then backing
off while it keeps dying), and passes SIGTERM on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from lbproxy import metrics
from lbproxy.config import Config, ListenerConfig
from lbproxy.control import Hosts, Stage
from lbproxy.handshake import Handshakes
from lbproxy.http_proxy import DURATION_BOUNDS, HttpListener, certificate_states
from lbproxy.pool import AdminState, Pool, Server
from lbproxy.runtime import Runtime, StartError
from lbproxy.tls import expiries

log = logging.getLogger("lbproxy.workers")

PUSH_EVERY = 0.1  # seconds between checks for a snapshot to push to the workers
COLLECT_EVERY = 5.0  # seconds between two collections of the counters, besides each read of them
STATS_TIMEOUT = 2.0  # a worker that does not answer in time is counted with its last numbers
RELOAD_TIMEOUT = 10.0  # for a worker to build and bind a reload, and then to commit it
RESTART_BACKOFF = 0.5  # a worker that dies again soon after its restart waits this long, then 2x, 4x...
RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that ran this long before dying is started again at once

Message = dict[str, Any]

_HEADER = struct.Struct("!I")  # a frame's length


def _pickle(message: Message) -> bytes:
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


def _unpickle(payload: bytes) -> Message:
    message: Message = pickle.loads(payload)  # from the supervisor only: see the module docstring
    return message


def _json(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _unjson(payload: bytes) -> Message:
    message: Message = json.loads(payload)
    return message


class Channel:
    """Framed messages over one end of a socket pair: each a 4-byte big-endian length, then the message,
    pickle from the supervisor and JSON from a worker (`for_supervisor`, `for_worker`)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        encode: Callable[[Message], bytes],
        decode: Callable[[bytes], Message],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._encode = encode
        self._decode = decode

    @classmethod
    async def for_supervisor(cls, sock: socket.socket) -> Channel:
        """The supervisor's end of its channel to a worker: sends pickle, reads JSON."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer, _pickle, _unjson)

    @classmethod
    async def for_worker(cls, sock: socket.socket) -> Channel:
        """A worker's end of its channel to the supervisor: sends JSON, reads pickle."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer, _json, _unpickle)

    def send(self, message: Message) -> None:
        """Queue `message`; dropped if the other side is gone (the supervisor learns it from the EOF)."""
        if self._writer.is_closing():
            return
        payload = self._encode(message)
        self._writer.writelines((_HEADER.pack(len(payload)), payload))

    async def receive(self) -> Message | None:
        """The next message; None once the other side has closed its end."""
        try:
            header = await self._reader.readexactly(_HEADER.size)
            payload = await self._reader.readexactly(_HEADER.unpack(header)[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return self._decode(payload)

    def close(self) -> None:
        self._writer.close()


def _hosts(pools: Mapping[str, Pool]) -> dict[tuple[str, str], str]:
    """The address each live server is reached at, by (pool, server)."""
    return {(pool.name, server.name): server.endpoint.host for pool in pools.values() for server in pool.servers}


# -- the worker side --


def _stats(runtime: Runtime) -> Message:
    """This worker's counters, as the supervisor sums them (`_add`): `inflight` and `active` are gauges."""
    servers = {
        f"{pool.name}/{server.name}": {
            "requests": server.requests,
            "inflight": server.inflight,
            "responses": list(server.responses),
            "connect_failures": server.connect_failures,
            "tls_handshakes": server.tls_handshakes,
            "tls_resumptions": server.tls_resumptions,
            "failures": server.failures,
            "sent_bytes": server.sent_bytes,
            "received_bytes": server.received_bytes,
        }
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
                responses=list(listener.responses),
                errors=dict(listener.errors),
                durations=list(listener.durations),
                duration_sum=listener.duration_sum,
                routes=dict(listener.route_counts()),
                wrong_protocol=listener.wrong_protocol,
            )
            if listener.handshakes is not None:
                numbers["handshakes"] = listener.handshakes.numbers()
            if listener.rate_limited is not None:
                numbers["rate_limited"] = listener.rate_limited
        listeners[name] = numbers
    pools = {name: pool.retried for name, pool in runtime.pools.items()}
    persistence = {
        name: [pool.persistence.hits, pool.persistence.misses, pool.persistence.redispatches]
        for name, pool in runtime.pools.items()
        if pool.persistence is not None
    }
    queues = {name: pool.queue.numbers() for name, pool in runtime.pools.items() if pool.queue is not None}
    hedges = {name: dict(pool.hedging.results) for name, pool in runtime.pools.items() if pool.hedging is not None}
    return {
        "servers": servers,
        "listeners": listeners,
        "pools": pools,
        "persistence": persistence,
        "queues": queues,
        "hedges": hedges,
    }


class _Reload:
    """A reload the supervisor asked this worker to prepare, until its word (commit or abandon) is in."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.word: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()  # None: abandon
        self.prepared = False
        self.task: asyncio.Task[list[str]] | None = None


_reloading: contextvars.ContextVar[_Reload] = contextvars.ContextVar("reloading")


class Follower:
    """A worker: serves with a `Runtime` built from the supervisor's config, follows its snapshots,
    reloads when and as the supervisor says, reports counters and passive downs."""

    def __init__(self, channel: Channel, start: Message) -> None:
        self.channel = channel
        self.runtime = Runtime(start["start"], serve=True, manage=False)
        self.runtime.stage_hook = self._await_word
        self.reloads: dict[int, _Reload] = {}  # asked for and not over, by number
        self._watch(self.runtime.pools)
        self.apply(start["state"])  # before binding: the first connection already sees the right state

    def _watch(self, pools: Mapping[str, Pool]) -> None:
        for pool in pools.values():
            pool.slow_start = None  # the supervisor ramps the weights and pushes them
            pool.on_down = self._report_down

    def _report_down(self, server: Server, reason: str) -> None:
        self.channel.send({"down": f"{server.pool.name}/{server.name}", "reason": reason})

    def apply(self, state: Message) -> None:
        """Follow a snapshot of the supervisor's (`Snapshot.as_message()`), unless it is older than the one
        applied last. One of the same version is applied: health events and live weights change between
        versions (see `Controller.snapshot`), and the channel keeps the supervisor's order. The worker's
        controller takes the snapshot's version: its version is the supervisor's it follows."""
        controller = self.runtime.controller
        if state["version"] < controller.version:
            log.warning("worker %d: ignoring a snapshot of version %d", os.getpid(), state["version"])
            return
        controller.version = state["version"]
        pools = self.runtime.pools
        for key, (up, admin, weight) in state["servers"].items():
            pool_name, _, server_name = key.partition("/")
            pool = pools.get(pool_name)
            server = pool.by_name.get(server_name) if pool is not None else None
            if pool is None or server is None:
                continue
            if server.admin.value != admin:
                pool.set_admin(server, AdminState(admin))
            if server.up != up:
                pool.set_health(server, up, "the supervisor's probes", force=True)
            pool.follow_weight(server, weight)

    async def serve(self) -> int:
        """Follow the supervisor until it says stop (SIGTERM) or is gone; then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # Ctrl-C reaches the supervisor, which decides
        self.channel.send({"ready": os.getpid()})
        waiting = loop.create_task(stopping.wait())
        code = 0
        while True:
            receiving = loop.create_task(self.channel.receive())
            await asyncio.wait({receiving, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                receiving.cancel()
                break
            message = receiving.result()
            if message is None:
                break  # the supervisor is gone
            if not await self.handle(message):
                code = 1
                break
        waiting.cancel()
        for reload in list(self.reloads.values()):
            if not reload.word.done():
                reload.word.set_result(None)
            if reload.task is not None:
                await reload.task
        await self.runtime.shutdown(self.runtime.config.shutdown_timeout)
        return code

    async def handle(self, message: Message) -> bool:
        """Act on one message, in the order they come; False: this worker cannot go on (it exits)."""
        if "commit" in message:  # before "state": a commit carries the new state
            return await self._commit(message)
        if "state" in message:
            self.apply(message["state"])
        elif "stats" in message:
            self.channel.send({"stats": message["stats"], **_stats(self.runtime)})
        elif "prepare" in message:
            self._prepare(message)
        elif "abandon" in message:
            reload = self.reloads.get(message["abandon"])
            if reload is not None and not reload.word.done():
                reload.word.set_result(None)
        elif "cut" in message:
            pool_name, _, server_name = message["cut"].partition("/")
            pool = self.runtime.pools.get(pool_name)
            server = pool.by_name.get(server_name) if pool is not None else None
            if server is not None:
                for listener in self.runtime.listeners.values():
                    listener.cut_server(server)
        return True

    # A reload: built beside the live state and bound (the runtime's reload with the supervisor's config),
    # then held in the stage hook until the supervisor's word. Messages go on being handled meanwhile.

    def _prepare(self, message: Message) -> None:
        reload = self.reloads[message["prepare"]] = _Reload(message["prepare"])
        reload.task = asyncio.get_running_loop().create_task(self._reload(reload, message["config"], message["hosts"]))
        reload.task.add_done_callback(lambda _: self.reloads.pop(reload.number, None))

    async def _reload(self, reload: _Reload, new: Config, hosts: Hosts) -> list[str]:
        _reloading.set(reload)  # in this task's context: what its stage hook is waiting for
        problems = await self.runtime.reload(new, hosts)
        if problems and not reload.prepared:  # refused while building: the supervisor waits to hear why
            self.channel.send({"refused": reload.number, "problems": problems})
        return problems

    async def _await_word(self, new: Config, pools: Mapping[str, Pool], hosts: Hosts) -> Stage:
        """The runtime's stage hook: the reload is built and bound; tell the supervisor, wait for its word."""
        reload = _reloading.get()
        reload.prepared = True
        self.channel.send({"prepared": reload.number})
        word = await reload.word
        if word is None:
            raise StartError("abandoned: the supervisor refused the reload (its log says why)")
        return _Following(self, pools, word["state"])

    async def _commit(self, message: Message) -> bool:
        reload = self.reloads.get(message["commit"])
        if reload is not None and reload.task is not None:
            if not reload.word.done():
                reload.word.set_result(message)
            if not await reload.task:  # the next message is handled once this reload is in place
                self.channel.send({"committed": reload.number})
                return True
        # Refused here (it started during the reload, and could not build it): it cannot follow.
        log.error("worker %d: cannot follow the supervisor's reload: exiting, to start on its config", os.getpid())
        return False


class _Following:
    """A worker's side of a committed reload (a `control.Stage`): the new pools follow the supervisor."""

    def __init__(self, follower: Follower, pools: Mapping[str, Pool], state: Message) -> None:
        self.follower = follower
        self.pools = pools
        self.state = state

    def commit(self) -> None:
        self.follower._watch(self.pools)
        self.follower.apply(self.state)  # in the same step: new servers take the supervisor's state at once

    def abandon(self) -> None:
        pass

    async def settle(self) -> None:
        pass


async def run_worker(channel: int) -> int:
    """A worker process: `channel` is the descriptor of its end of the socket pair to its supervisor."""
    link = await Channel.for_worker(socket.socket(fileno=channel))
    try:
        start = await link.receive()
        if start is None or "start" not in start:
            log.error("worker %d: the supervisor sent no config", os.getpid())
            return 1
        follower = Follower(link, start)
        try:
            await follower.runtime.start(start["hosts"])
        except StartError as error:
            log.error("worker %d: %s", os.getpid(), error)
            return 1
        return await follower.serve()
    finally:
        link.close()


# -- the supervisor side --


def _expiries(listener: ListenerConfig) -> tuple[tuple[str, float], ...]:
    return expiries(listener.tls.certificates) if listener.tls is not None else ()


def _add(total: Any, more: Any) -> Any:
    """`more` added into `total`, item by item: numbers add, lists of one length add element-wise,
    mappings add key by key; anything else (a listener's mode, its pool) is taken from `more`."""
    if isinstance(more, dict):
        merged = dict(total) if isinstance(total, dict) else {}
        for key, value in more.items():
            merged[key] = _add(merged[key], value) if key in merged else value
        return merged
    if isinstance(more, list) and isinstance(total, list) and len(more) == len(total):
        return [_add(a, b) for a, b in zip(total, more, strict=True)]
    if isinstance(more, int | float) and isinstance(total, int | float):
        return total + more
    return more


def _at_rest(stats: Message) -> Message:
    """A dead worker's last counters, kept in the totals: its gauges (in flight, open) are gone with it."""
    servers = {key: {**numbers, "inflight": 0} for key, numbers in stats["servers"].items()}
    listeners = {name: {**numbers, "active": 0} for name, numbers in stats["listeners"].items()}
    queues = {name: {**numbers, "length": 0} for name, numbers in stats.get("queues", {}).items()}
    return {
        "servers": servers,
        "listeners": listeners,
        "pools": stats["pools"],
        "persistence": stats["persistence"],
        "queues": queues,
        "hedges": stats.get("hedges", {}),
    }


def _requests(stats: Message | None) -> int:
    if stats is None:
        return 0
    return sum(numbers.get("requests", 0) for numbers in stats["listeners"].values())


class ListenerTotals:
    """One listener's counters summed over the workers: what metrics and the API read."""

    def __init__(self, name: str, numbers: dict[str, Any], certificates: tuple[tuple[str, float], ...] = ()) -> None:
        self.name = name
        self.certificates = certificates
        self.mode = numbers["mode"]
        self.pool_name = numbers["pool"]
        self.active_connections = numbers["active"]
        self.connections_total = numbers["connections_total"]
        self.rejected = numbers["rejected"]
        self.retries = numbers["retries"]
        self.bad_proxy_headers = numbers["bad_proxy_headers"]
        self.requests = 0
        self.responses = [0] * 6
        self.errors: dict[int, int] = {}
        self.durations = [0] * (len(DURATION_BOUNDS) + 1)
        self.duration_sum = 0.0
        self.routes: dict[str, int] = {}
        self.wrong_protocol = 0
        self.handshakes = Handshakes.of(numbers["handshakes"]) if "handshakes" in numbers else None
        self.rate_limited: int | None = numbers.get("rate_limited")
        if self.mode == "http":
            self.routes = numbers["routes"]
            self.wrong_protocol = numbers["wrong_protocol"]
            self.requests = numbers["requests"]
            self.responses = numbers["responses"]
            self.errors = {int(status): count for status, count in numbers["errors"].items()}
            self.durations = numbers["durations"]
            self.duration_sum = numbers["duration_sum"]

    def route_counts(self) -> list[tuple[str, int]]:
        return list(self.routes.items())

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
            "certificates": certificate_states(self.certificates),
            "tls_handshakes": self.handshakes.state() if self.handshakes is not None else None,
            "routes": [{"name": name, "requests": count} for name, count in self.routes.items()],
        }


class Worker:
    """One worker slot, as the supervisor sees it: the process now in it and what that said last."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None  # None while no process runs in the slot
        self.ready = False
        self.pending: dict[tuple[str, int], asyncio.Future[Message | None]] = {}  # None: the process died
        self.stats: Message | None = None  # the process's counters at its last answer
        self.retired_requests = 0  # requests of the slot's processes that died
        self.started = 0.0  # monotonic time of the process's start
        self.quick_deaths = 0  # in a row, each soon after its start: the restart backoff
        self.task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.channel is not None

    def send(self, message: Message) -> None:
        if self.channel is not None:
            self.channel.send(message)

    def ask(self, key: tuple[str, int], message: Message) -> asyncio.Future[Message | None]:
        """Send `message`; the future gets the answer filed under `key`, or None if the process dies first."""
        future: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()
        self.pending[key] = future
        self.send(message)
        return future

    def answer(self, key: tuple[str, int], message: Message) -> None:
        future = self.pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(message)

    def forget(self, key: tuple[str, int]) -> None:
        future = self.pending.pop(key, None)
        if future is not None and not future.done():
            future.cancel()

    def gone(self) -> None:
        """The process died: nothing it was asked will be answered."""
        self.channel = None
        self.ready = False
        for future in self.pending.values():
            if not future.done():
                future.set_result(None)
        self.pending.clear()

    def restart_delay(self, now: float) -> float:
        """How long to wait before starting the slot's process again: at once after a run of
        STABLE_AFTER or more, else RESTART_BACKOFF doubled for each quick death in a row, capped."""
        if now - self.started >= STABLE_AFTER:
            self.quick_deaths = 0
        self.quick_deaths += 1
        if self.quick_deaths == 1:
            return 0.0
        return float(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (self.quick_deaths - 2)))


class Supervisor:
    """Runs the workers and the managing runtime; see the module docstring."""

    def __init__(self, loaded: Config, count: int, log_level: str = "info") -> None:
        self.runtime = Runtime(loaded, serve=False, manage=True)
        self.runtime.refresh_hook = self.collect
        self.runtime.cut_hook = self._cut
        self.runtime.stage_hook = self._stage_workers  # every reload, from SIGHUP or the API, reaches them
        self.runtime.registry = metrics.registry(self)  # /metrics reads the sums, through this view
        self.runtime.workers_ready = False
        self.log_level = log_level
        self.workers = [Worker(index) for index in range(count)]
        self.restarts = 0
        self.stopping = False
        self.totals: dict[str, ListenerTotals] = {}
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._asked = 0  # numbers the stats requests and the reloads
        self._pushed: Message = {}
        self._retired: Message = {
            "servers": {},
            "listeners": {},
            "pools": {},
            "persistence": {},
        }  # dead workers' last counters

    async def start(self) -> None:
        await self.runtime.start()
        for worker in self.workers:
            worker.task = self._spawn_task(self._keep(worker))
        self._spawn_task(self._push_state())
        self._spawn_task(self._collect_often())

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor: %s failed", task.get_coro(), exc_info=task.exception())

    # -- the worker processes --

    async def _keep(self, worker: Worker) -> None:
        """Keep a process in `worker`'s slot until lbproxy stops: start it, hear it, start it again
        when it dies (backing off while it keeps dying soon after its start)."""
        while not self.stopping:
            try:
                process = await self._spawn(worker)
            except OSError as error:
                worker.started = time.monotonic()
                delay = worker.restart_delay(worker.started)
                log.error("worker %d: cannot start a process: %s: trying again in %gs", worker.index, error, delay)
            else:
                channel = worker.channel
                assert channel is not None
                while (message := await channel.receive()) is not None:
                    self._heard(worker, message)
                code = await process.wait()
                channel.close()
                worker.gone()
                self._retire(worker)
                if self.stopping:
                    return
                self.restarts += 1
                delay = worker.restart_delay(time.monotonic())
                later = f" in {delay:g}s" if delay else ""
                log.error("worker %d (pid %d) exited with %s: restarting it%s", worker.index, process.pid, code, later)
            self.runtime.workers_ready = False
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), delay)

    async def _spawn(self, worker: Worker) -> asyncio.subprocess.Process:
        """Start a worker process in the slot and hand it the running config, with the live state."""
        ours, theirs = socket.socketpair()
        try:
            channel = await Channel.for_supervisor(ours)
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lbproxy",
                "worker",
                "--channel",
                str(theirs.fileno()),
                "--log-level",
                self.log_level,
                "--log-format",
                self.runtime.config.log_format,
                stdin=asyncio.subprocess.DEVNULL,  # stdout and stderr are the supervisor's: logs, access logs
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # No await from here on: the config and the snapshot sent are those live as it starts; a reload
        # committed later reaches it as it reaches every running worker.
        worker.process = process
        worker.channel = channel
        worker.started = time.monotonic()
        controller = self.runtime.controller
        channel.send({"start": controller.config, "hosts": _hosts(controller.pools), "state": self._snapshot()})
        if self.stopping:
            process.send_signal(signal.SIGTERM)
        return process

    def _heard(self, worker: Worker, message: Message) -> None:
        if "ready" in message:
            worker.ready = True
            self.runtime.workers_ready = all(w.ready for w in self.workers)
            log.info("worker %d (pid %d) ready", worker.index, message["ready"])
        elif "stats" in message:
            worker.answer(("stats", message["stats"]), message)
        elif "prepared" in message:
            worker.answer(("prepare", message["prepared"]), message)
        elif "refused" in message:
            worker.answer(("prepare", message["refused"]), message)
        elif "committed" in message:
            worker.answer(("commit", message["committed"]), message)
        elif "down" in message:
            self._passive_down(message["down"], message.get("reason", ""))
            # Whatever the supervisor made of it (its depool guard may have refused it), the worker
            # follows that now, instead of keeping the server down until something else changes.
            worker.send({"state": self._snapshot()})

    def _retire(self, worker: Worker) -> None:
        """Keep a dead process's last counters in the totals: they never go down."""
        if worker.stats is not None:
            self._retired = _add(self._retired, _at_rest(worker.stats))
            worker.retired_requests += _requests(worker.stats)
            worker.stats = None

    def _snapshot(self) -> Message:
        return self.runtime.controller.snapshot().as_message()

    def _cut(self, server: Server) -> None:
        """A disabled server's grace is over: every worker cuts its connections to it."""
        for worker in self.workers:
            worker.send({"cut": f"{server.pool.name}/{server.name}"})

    def _passive_down(self, key: str, reason: str) -> None:
        pool_name, _, server_name = key.partition("/")
        pool = self.runtime.pools.get(pool_name)
        server = pool.by_name.get(server_name) if pool is not None else None
        if pool is not None and server is not None and server.up:
            pool.set_health(server, False, reason)

    async def _push_state(self) -> None:
        while True:
            state = self._snapshot()
            if state != self._pushed:
                self._pushed = state
                for worker in self.workers:
                    worker.send({"state": state})
            await asyncio.sleep(PUSH_EVERY)

    async def _collect_often(self) -> None:
        """Collect the counters now and then, not only when they are read: a worker that dies takes the
        requests it served since its last answer with it, so that loss is kept short."""
        while True:
            await asyncio.sleep(COLLECT_EVERY)
            await self.collect()

    # -- reload: the workers are part of the supervisor's --

    async def _stage_workers(self, new: Config, pools: Mapping[str, Pool], hosts: Hosts) -> Stage:
        """The runtime's stage hook: every running worker builds the reload beside its live state and
        binds its new sockets. Refused (StartError) unless every worker that answers could; a worker
        that dies meanwhile is left out (it starts again on the config live then)."""
        self._asked += 1
        number = self._asked
        message = {"prepare": number, "config": new, "hosts": dict(hosts)}
        asked = {worker: worker.ask(("prepare", number), message) for worker in self.workers if worker.running}
        processes = {worker: worker.process for worker in asked}
        if asked:
            await asyncio.wait(asked.values(), timeout=RELOAD_TIMEOUT)
        problems: dict[str, list[int]] = {}
        for worker, future in asked.items():
            if not future.done():
                worker.forget(("prepare", number))
                problems.setdefault(f"no answer within {RELOAD_TIMEOUT:g}s", []).append(worker.index)
                continue
            answer = future.result()
            if answer is not None and "refused" in answer:
                for problem in answer["problems"]:
                    problems.setdefault(problem, []).append(worker.index)
        stage = _WorkersStage(self, number, message, processes)
        if problems:
            stage.abandon()
            raise StartError(
                "; ".join(
                    f"worker{'s' if len(indexes) > 1 else ''} {', '.join(map(str, indexes))}: {problem}"
                    for problem, indexes in problems.items()
                )
            )
        return stage

    # -- counters, summed over the workers --

    async def collect(self) -> None:
        """Sum every worker's counters into the supervisor's servers, pools and listener totals: those of
        the workers that answer now, the last ones of those that do not, and those of the dead."""
        self._asked += 1
        key = ("stats", self._asked)
        asked = {worker: worker.ask(key, {"stats": self._asked}) for worker in self.workers if worker.running}
        if asked:
            await asyncio.wait(asked.values(), timeout=STATS_TIMEOUT)
        for worker, future in asked.items():
            if future.done():
                answer = future.result()
                if answer is not None:
                    worker.stats = answer
            else:
                worker.forget(key)
        total = self._retired
        for worker in self.workers:
            if worker.stats is not None:
                total = _add(total, worker.stats)
        for pool in self.runtime.pools.values():
            pool.retried = total["pools"].get(pool.name, pool.retried)
            persisted = total["persistence"].get(pool.name)
            if pool.persistence is not None and persisted is not None:
                pool.persistence.hits, pool.persistence.misses, pool.persistence.redispatches = persisted
            queued = total.get("queues", {}).get(pool.name)
            if pool.queue is not None and queued is not None:
                pool.queue.summed(queued)
            hedged = total.get("hedges", {}).get(pool.name)
            if pool.hedging is not None and hedged is not None:
                pool.hedging.results = dict(hedged)
            for server in pool.servers:
                numbers = total["servers"].get(f"{pool.name}/{server.name}")
                if numbers is None:
                    continue
                server.requests = numbers["requests"]
                server.inflight = numbers["inflight"]
                server.responses = list(numbers["responses"])
                server.connect_failures = numbers["connect_failures"]
                server.tls_handshakes = numbers["tls_handshakes"]
                server.tls_resumptions = numbers["tls_resumptions"]
                server.failures = numbers["failures"]
                server.sent_bytes = numbers["sent_bytes"]
                server.received_bytes = numbers["received_bytes"]
        # not those a reload removed; the certificates are the running config's, not the workers' to say
        live = {listener.name: listener for listener in self.runtime.config.listeners}
        self.totals = {
            name: ListenerTotals(name, numbers, _expiries(live[name]))
            for name, numbers in total["listeners"].items()
            if name in live
        }
        self.runtime.listener_totals = self.totals

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
        return {str(worker.index): worker.retired_requests + _requests(worker.stats) for worker in self.workers}

    @property
    def worker_restarts(self) -> int:
        return self.restarts

    async def reload(self) -> list[str]:
        """SIGHUP's: the runtime's reload, which the admin API calls too; the workers take part in it."""
        return await self.runtime.reload()

    async def shutdown(self) -> None:
        """SIGTERM every worker, wait for them (killing those still there after shutdown_timeout + 5 s),
        then stop the managing runtime."""
        self.stopping = True
        self._stopped.set()  # a slot waiting to restart its worker does not
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        slots = [worker.task for worker in self.workers if worker.task is not None]
        if slots:
            _, late = await asyncio.wait(slots, timeout=self.runtime.config.shutdown_timeout + 5)
            if late:
                for worker in self.workers:
                    if worker.process is not None and worker.process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            worker.process.kill()
                await asyncio.wait(late)
        for task in list(self._tasks):
            task.cancel()
        await self.runtime.stop()


class _WorkersStage:
    """The workers' side of a reload, prepared by all of them (a `control.Stage`): committed as part of the
    supervisor's commit, then awaited until every worker has it in place."""

    def __init__(
        self,
        supervisor: Supervisor,
        number: int,
        prepare: Message,
        processes: Mapping[Worker, asyncio.subprocess.Process | None],
    ) -> None:
        self.supervisor = supervisor
        self.number = number
        self.prepare = prepare
        self.processes = processes  # the process each asked worker had then
        self.committed: dict[Worker, asyncio.Future[Message | None]] = {}

    def commit(self) -> None:
        """Part of the supervisor's commit step: the snapshot sent is the new state, at its new version."""
        state = self.supervisor._snapshot()
        for worker in self.supervisor.workers:
            if not worker.running:
                continue  # a slot between two processes: the next starts on the committed config
            if self.processes.get(worker, False) is not worker.process:
                worker.send(self.prepare)  # started during the reload, on the config before it
            self.committed[worker] = worker.ask(("commit", self.number), {"commit": self.number, "state": state})

    def abandon(self) -> None:
        for worker, process in self.processes.items():
            if worker.process is process:
                worker.send({"abandon": self.number})

    async def settle(self) -> None:
        """Wait until every worker serves the new config, so that a reload the API confirms is in force."""
        if not self.committed:
            return
        await asyncio.wait(self.committed.values(), timeout=RELOAD_TIMEOUT)
        for worker, future in self.committed.items():
            if not future.done():
                worker.forget(("commit", self.number))
                log.error("reload: worker %d has not committed it after %gs", worker.index, RELOAD_TIMEOUT)
