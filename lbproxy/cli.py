"""The `lbproxy` command: `check` a config, `run` the load balancer, start the `demo`.

Parses arguments, sets up logging and the uvloop event loop, and turns a Runtime's start errors and a
config's problems into messages and exit codes. Nothing here is used by the proxy at run time.

At the top: the standard library and `lbproxy.ctl` only, so that `lbproxy ctl` starts in a few tens of
milliseconds (an operator scripts twenty drains). uvloop, asyncio, the config (PyYAML) and the runtime
(aiohttp, the protocols) are imported inside the functions of the commands that need them;
tests/test_ctl.py checks that `ctl` loads none of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lbproxy import __version__, build
from lbproxy import ctl as control

if TYPE_CHECKING:
    from collections.abc import Callable

    from lbproxy import config
    from lbproxy.runtime import Runtime

log = logging.getLogger("lbproxy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbproxy", description="A load balancer for a farm of servers.")
    parser.add_argument("--version", action="version", version=f"lbproxy {__version__} ({build.described()})")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a config file and exit")
    check.add_argument("-c", "--config", required=True, help="the config file")
    check.add_argument(
        "--no-resolve",
        action="store_true",
        help="do not look up server host names (to check a config on a machine outside the farm)",
    )
    run = commands.add_parser("run", help="run the load balancer")
    run.add_argument("-c", "--config", required=True, help="the config file")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    run.add_argument(
        "--workers",
        default="1",
        help="worker processes sharing each listening port (SO_REUSEPORT); 'auto': one per CPU (default 1)",
    )
    # Started by the supervisor of `run --workers N`, not by people: no help, so that argparse lists it
    # nowhere (the metavar below replaces the choices in the usage line).
    # It reads no config file: its supervisor sends it the running config over the socket pair whose
    # end is the descriptor --channel (lbproxy.workers).
    worker = commands.add_parser("worker")
    worker.add_argument("--channel", type=int, required=True, metavar="FD")
    worker.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    worker.add_argument("--log-format", default="plain", choices=("plain", "json"))
    _add_ctl(commands)
    demo_command = commands.add_parser(
        "demo", help="start one process per demo back-end, then lbproxy in front of them (`make run`)"
    )
    demo_command.add_argument("-c", "--config", default="config/demo.yaml", help="the demo config file")
    demo_command.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    backend = commands.add_parser("demo-backend", help="run one demo back-end (what `demo` starts for each server)")
    backend.add_argument("name", help="the server's name, in every answer")
    backend.add_argument("address", help="HOST:PORT to listen on")
    backend.add_argument("--demo-pid", type=int, metavar="PID", help="exit when process PID (the demo) ends")
    commands.metavar = "{" + ",".join(name for name in commands.choices or () if name != "worker") + "}"
    args = parser.parse_args(argv)

    if args.command == "check":
        return _check(args.config, resolve=not args.no_resolve)
    if args.command == "demo-backend":
        from lbproxy import demo  # aiohttp's server: loaded for the demo only

        return demo.run_backend(args.name, args.address, args.demo_pid)
    if args.command in ("run", "demo", "worker"):
        # A SIGHUP before the reload handler is installed must not end the process (its default),
        # and a worker reloads when its supervisor tells it, never on its own signal.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.command == "ctl":
        return control.run(
            args.admin,
            args.token,
            args.action,
            getattr(args, "pool", None),
            getattr(args, "server", None),
            local=getattr(args, "local", False),
            percent=getattr(args, "percent", None),
            definition=(
                {"name": args.server, "address": args.address, "ratio": args.ratio, "backup": args.backup}
                if args.action == "add-server"
                else None
            ),
        )
    import asyncio

    import uvloop

    if args.command == "worker":
        from lbproxy.workers import run_worker

        _log_to_stderr(args.log_format, args.log_level)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run_worker(args.channel))

    from lbproxy import config

    try:
        loaded = config.load(args.config)
    except config.ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    _log_to_stderr(loaded.log_format, args.log_level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        workers = _workers(getattr(args, "workers", "1"))
        if workers is None:
            print(f"lbproxy: --workers takes a number or 'auto', not {args.workers!r}", file=sys.stderr)
            return 2
        if workers > 1:
            return runner.run(_supervise(loaded, workers, args.log_level))
        if args.command == "demo":
            from lbproxy import demo

            return runner.run(demo.run(loaded, _serve))
        return runner.run(_serve(loaded))


def _add_ctl(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`lbproxy ctl [OPTIONS] COMMAND [OPTIONS]`: --admin and --token before or after the command.

    The options after the command are declared again on each command with no default (SUPPRESS), so
    that one given there overrides one given before it and one not given leaves it alone.
    """
    admin = os.environ.get(control.ADMIN_VARIABLE) or control.DEFAULT_ADMIN
    ctl = commands.add_parser(
        "ctl",
        help="talk to a running lbproxy through its admin API",
        description="Talk to a running lbproxy through its admin API (the admin block of its config).",
        epilog=(
            f"--admin defaults to ${control.ADMIN_VARIABLE} when it is set, else {control.DEFAULT_ADMIN}; "
            f"--token defaults to ${control.TOKEN_VARIABLE}. Both may come before or after the command; "
            "given in both places, the one after it wins. Exit codes: 0 done, 1 the API refused (the "
            "message says why), 2 the admin server could not be reached."
        ).replace("%", "%%"),
    )
    if admin == control.DEFAULT_ADMIN:
        admin_help = f"the admin server's URL (default: {admin}; ${control.ADMIN_VARIABLE} overrides it)"
    else:
        admin_help = f"the admin server's URL (default: ${control.ADMIN_VARIABLE}, now {admin})"
    token_help = f"bearer token for the writes (default: ${control.TOKEN_VARIABLE})"
    options = argparse.ArgumentParser(add_help=False)
    for parser, admin_default, token_default in (
        (ctl, admin, os.environ.get(control.TOKEN_VARIABLE)),
        (options, argparse.SUPPRESS, argparse.SUPPRESS),
    ):
        parser.add_argument("--admin", metavar="URL", default=admin_default, help=admin_help.replace("%", "%%"))
        parser.add_argument("--token", metavar="TOKEN", default=token_default, help=token_help)
    actions = ctl.add_subparsers(dest="action", required=True, title="commands")
    actions.add_parser("status", parents=[options], help="pools and servers, their state and counters")
    actions.add_parser("reload", parents=[options], help="re-read the config file (an invalid one changes nothing)")
    actions.add_parser("cluster", parents=[options], help="the fleet of lbproxy nodes this one sees on etcd")
    for action, text in (
        ("drain", "no new requests to the server; in-flight ones finish"),
        ("disable", "as drain, then cut what remains after the pool's disable_grace"),
        ("enable", "put the server back in rotation"),
    ):
        command = actions.add_parser(action, parents=[options], help=text, description=text)
        command.add_argument("pool", help="the pool's name in the config")
        command.add_argument("server", help="the server's name in that pool")
        command.add_argument(
            "--local", action="store_true", help="with a cluster block: on this node only, not the whole fleet"
        )
    text = "set the server's live weight, as a percentage (0-100) of its ratio"
    weight = actions.add_parser("weight", parents=[options], help=text, description=text)
    weight.add_argument("pool", help="the pool's name in the config")
    weight.add_argument("server", help="the server's name in that pool")
    weight.add_argument("percent", type=int, help="0 to 100: 0 sends nothing new")
    weight.add_argument("--local", action="store_true", help="with a cluster block: on this node only")
    text = "add a server to a pool at run time (with a cluster block: on every node)"
    add = actions.add_parser("add-server", parents=[options], help=text, description=text)
    add.add_argument("pool", help="the pool's name in the config")
    add.add_argument("server", help="the new server's name")
    add.add_argument("address", help="HOST:PORT")
    add.add_argument("--ratio", type=int, default=1, help="its share, as in the config (default 1)")
    add.add_argument("--backup", action="store_true", help="a backup server")
    add.add_argument("--local", action="store_true", help="with a cluster block: on this node only")
    text = "remove a server from a pool at run time (what it has in flight finishes)"
    remove = actions.add_parser("remove-server", parents=[options], help=text, description=text)
    remove.add_argument("pool", help="the pool's name in the config")
    remove.add_argument("server", help="the server's name in that pool")
    remove.add_argument("--local", action="store_true", help="with a cluster block: on this node only")
    actions.metavar = "{" + ",".join(actions.choices or ()) + "}"  # also in "arguments are required"


def _log_to_stderr(log_format: str, level: str) -> None:
    """lbproxy's own events on standard error, one line each, plain or JSON (`log_format`)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


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


async def _supervise(loaded: config.Config, count: int, log_level: str) -> int:
    """`run --workers N`: the supervisor (lbproxy.workers), until SIGINT or SIGTERM; SIGHUP reloads."""
    import asyncio

    from lbproxy.runtime import StartError
    from lbproxy.workers import Supervisor

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    supervisor = Supervisor(loaded, count, log_level)
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


def _check(path: str, resolve: bool) -> int:
    """`lbproxy check`: the config's problems and, with `resolve`, the server names `run` could not look up."""
    from lbproxy import config

    try:
        loaded = config.load(path, resolve=resolve)
    except config.ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        print(f"{path}: {len(error.problems)} error{'s' if len(error.problems) != 1 else ''}", file=sys.stderr)
        return 1
    print(loaded.summary())
    return 0


async def _serve(loaded: config.Config, started: Callable[[Runtime], object] | None = None) -> int:
    """Run lbproxy until SIGINT or SIGTERM; `started` (the demo's) is called once it serves."""
    import asyncio

    from lbproxy.runtime import Runtime, StartError

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    runtime = Runtime(loaded)
    try:
        await runtime.start()
    except StartError as error:
        log.error("%s", error)
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
    if started is not None:
        started(runtime)
    await stopping.wait()
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("shutting down: reload ignored"))
    await runtime.shutdown(runtime.config.shutdown_timeout)
    log.info("stopped")
    return 0
