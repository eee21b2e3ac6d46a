"""The `lbproxy` command: `check` a config, `run` the load balancer, start the `demo`.

Parses arguments, sets up logging and the uvloop event loop, and turns a Runtime's start errors and a
config's problems into messages and exit codes. Nothing here is used by the proxy at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvloop

from lbproxy import __version__, config
from lbproxy.runtime import Runtime, StartError

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("lbproxy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbproxy", description="A load balancer for a farm of servers.")
    parser.add_argument("--version", action="version", version=f"lbproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a config file and exit")
    check.add_argument("-c", "--config", required=True, help="the config file")
    run = commands.add_parser("run", help="run the load balancer")
    run.add_argument("-c", "--config", required=True, help="the config file")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    run.add_argument(
        "--workers",
        default="1",
        help="worker processes sharing each listening port (SO_REUSEPORT); 'auto': one per CPU (default 1)",
    )
    worker = commands.add_parser("worker")  # started by the supervisor of `run --workers N`: not for people
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ctl = commands.add_parser("ctl", help="talk to a running lbproxy through its admin API")
    ctl.add_argument("--admin", default=os.environ.get("LBPROXY_ADMIN", "http://127.0.0.1:9090"), help="admin URL")
    ctl.add_argument("--token", default=os.environ.get("LBPROXY_ADMIN_TOKEN"), help="bearer token for writes")
    ctl_commands = ctl.add_subparsers(dest="action", required=True)
    ctl_commands.add_parser("status", help="pools and servers, their state and counters")
    ctl_commands.add_parser("reload", help="re-read the config file (an invalid one changes nothing)")
    for action, text in (
        ("drain", "no new requests to the server; in-flight ones finish"),
        ("disable", "as drain, then cut what remains after the pool's disable_grace"),
        ("enable", "put the server back in rotation"),
    ):
        command = ctl_commands.add_parser(action, help=text)
        command.add_argument("pool")
        command.add_argument("server")
    demo = commands.add_parser("demo", help="run demo back-ends and lbproxy in front of them")
    demo.add_argument("-c", "--config", default="config/demo.yaml", help="the demo config file")
    demo.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)

    if args.command == "check":
        return _check(args.config)
    if args.command in ("run", "demo", "worker"):
        # A SIGHUP before the reload handler is installed must not end the process (its default),
        # and a worker reloads when its supervisor tells it, never on its own signal.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.command == "ctl":
        from lbproxy import ctl as control  # stdlib only: fast to start

        return control.run(
            args.admin, args.token, args.action, getattr(args, "pool", None), getattr(args, "server", None)
        )
    try:
        loaded = config.load(args.config)
    except config.ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    handler = logging.StreamHandler(sys.stderr)
    if loaded.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if args.command == "worker":
            from lbproxy.workers import run_worker

            return runner.run(run_worker(args.config))
        workers = _workers(getattr(args, "workers", "1"))
        if workers is None:
            print(f"lbproxy: --workers takes a number or 'auto', not {args.workers!r}", file=sys.stderr)
            return 2
        if workers > 1:
            return runner.run(_supervise(args.config, loaded, workers))
        return runner.run(_serve(loaded, demo=args.command == "demo"))


class JsonFormatter(logging.Formatter):
    """`log_format: json`: one JSON object a line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _workers(value: str) -> int | None:
    if value == "auto":
        return os.cpu_count() or 1
    return int(value) if value.isdigit() and int(value) >= 1 else None


async def _supervise(path: str, loaded: config.Config, count: int) -> int:
    from lbproxy.workers import Supervisor

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    supervisor = Supervisor(path, loaded, count)
    try:
        await supervisor.start()
    except StartError as error:
        log.error("%s", error)
        await supervisor.shutdown()
        return 1
    reloads: set[asyncio.Task[list[str]]] = set()

    def reload() -> None:
        task = loop.create_task(supervisor.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    binds = ", ".join(f"{listener.name} on {listener.bind}" for listener in loaded.listeners)
    print(f"lbproxy: {count} workers serving {binds}; Ctrl-C stops, SIGHUP reloads.", flush=True)
    for name, bound in supervisor.runtime.bound.items():
        print(f"{name}: metrics, API and status page at {bound.scheme}://{bound.host}:{bound.port}/", flush=True)
    await stopping.wait()
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("shutting down: reload ignored"))
    await supervisor.shutdown()
    log.info("stopped")
    return 0


def _check(path: str) -> int:
    try:
        loaded = config.load(path)
    except config.ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: {len(error.problems)} error{'s' if len(error.problems) != 1 else ''}", file=sys.stderr)
        return 1
    print(loaded.summary())
    return 0


async def _serve(loaded: config.Config, demo: bool) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    backends: list[web.AppRunner] = []
    if demo:
        from lbproxy.demo import start_backend  # aiohttp's server is only loaded for the demo

        addresses = [(server.name, server.address) for pool in loaded.pools.values() for server in pool.servers]
        backends = [await start_backend(name, address) for name, address in addresses]
        print(f"demo: {len(backends)} back-ends on " + ", ".join(str(address) for _, address in addresses))
    runtime = Runtime(loaded)
    try:
        await runtime.start()
    except StartError as error:
        log.error("%s", error)
        for backend in backends:
            await backend.cleanup()
        return 1
    reloads: set[asyncio.Task[list[str]]] = set()

    def reload() -> None:
        task = loop.create_task(runtime.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    for bound in runtime.bound.values():
        what = "metrics, API and status page at" if bound.name == "admin" else "send traffic to"
        print(f"{bound.name}: {what} {bound.scheme}://{bound.host}:{bound.port}/", flush=True)
    print("Ctrl-C stops lbproxy; SIGHUP reloads its config.", flush=True)
    await stopping.wait()
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("shutting down: reload ignored"))
    await runtime.shutdown(runtime.config.shutdown_timeout)
    for backend in backends:
        await backend.cleanup()
    log.info("stopped")
    return 0
