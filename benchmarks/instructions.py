"""Instructions per keep-alive request on the L7 hot path, counted by valgrind: steady where timings are not.

    python benchmarks/instructions.py [--request wrk|browser] [--listener plain|routes|cookie] [--base DIR]

Runs the request/response cycle of micro/bench_http.py (stub transports, no event loop, no kernel)
under `valgrind --tool=cachegrind` for 2,000 and for 6,000 cycles and divides the difference by
4,000, so that start-up cancels out. On this shared machine a timing of the same code moves by 15%
from one run to the next; the count moves by well under 1%, which makes it the measure for a change
of a few per cent to the Python work (which, with uvloop, is nearly all of lbproxy's user time).
It is a count, not a time: check a change that moves memory around with `make bench` as well.

`--listener` picks the listener the cycle runs through (issue #15): `plain` (the default: no routes,
no persistence), `routes` (10 host routes, the one the request's Host matches written last, to a
second pool) or `cookie` (a pool with cookie persistence, the request carrying its server's cookie,
which is taken out before the server). The difference from `plain` is what routing or persistence
costs per request.

Each checkout is counted as it would run: compiled with mypyc when its compiled modules are built
and match their source (`make build`, issue #19), else pure Python. `--pure` counts this checkout's
pure-Python build as well (`LBPROXY_PURE=1`), for the compiled build's gain in one command.

`--base DIR` counts the lbproxy package of another checkout as well (`git worktree add DIR REV`),
for a before-and-after from one command; `routes` and `cookie` need a checkout with lbproxy/routing.py
and lbproxy/persistence.py (issue #15): with an older one only `plain` can be counted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WRK_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what `wrk` sends, as in make bench
SHORT, LONG = 2_000, 6_000


LISTENERS = ("plain", "routes", "cookie")  # as micro/bench_http.py's
STEERING_MODULES = ("routing.py", "persistence.py")  # what `routes` and `cookie` need in a checkout


def run_cycles(cycles: int, request: str, listener: str) -> None:
    """The measured part: `cycles` request/response exchanges on one client and one server connection."""
    sys.path.insert(0, str(HERE / "micro"))
    import uvloop
    from bench_http import Cycle
    from conftest import BROWSER_REQUEST

    loop = uvloop.new_event_loop()
    if listener == "plain":  # as before issue #15, so that --base counts older checkouts
        cycle = Cycle(loop, WRK_REQUEST if request == "wrk" else BROWSER_REQUEST)
    else:
        cycle = Cycle(loop, WRK_REQUEST if request == "wrk" else BROWSER_REQUEST, listener)
    for _ in range(cycles):
        cycle()
    assert cycle.listener.requests == cycles
    if listener != "plain":  # every request went where the route or the cookie says
        assert cycle.server.responses[2] == cycles
        persistence = cycle.pool.persistence
        assert listener != "cookie" or (persistence is not None and persistence.hits == cycles)
    loop.close()


def count(package_root: Path, cycles: int, request: str, listener: str, pure: bool = False) -> int:
    """Instructions valgrind counts for a whole run of `cycles` cycles with lbproxy from `package_root`."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--cycles",
        str(cycles),
        "--request",
        request,
        "--listener",
        listener,
    ]
    env = {**os.environ, "PYTHONPATH": str(package_root), "LBPROXY_PURE": "1" if pure else ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_request(package_root: Path, request: str, listener: str, pure: bool = False) -> float:
    long = count(package_root, LONG, request, listener, pure)
    short = count(package_root, SHORT, request, listener, pure)
    return (long - short) / (LONG - SHORT)


def build_of(package_root: Path, pure: bool = False) -> str:
    """Which build of lbproxy runs from `package_root`: "mypyc" or "pure"."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "LBPROXY_PURE": "1" if pure else ""}
    code = "import lbproxy, sys; print(getattr(getattr(lbproxy, 'build', None), 'RUNNING', 'pure'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--request", choices=("wrk", "browser"), default="wrk", help="the request head (default wrk)")
    parser.add_argument(
        "--listener",
        choices=LISTENERS,
        default="plain",
        help="plain (default), with 10 host routes, or with cookie persistence and the cookie sent",
    )
    parser.add_argument("--base", type=Path, help="another checkout to count as well")
    parser.add_argument("--pure", action="store_true", help="count this checkout's pure-Python build as well")
    parser.add_argument("--cycles", type=int, help=argparse.SUPPRESS)  # the run under valgrind
    args = parser.parse_args()
    if args.cycles is not None:
        run_cycles(args.cycles, args.request, args.listener)
        return 0
    if args.base is not None:
        if not (args.base / "lbproxy" / "__init__.py").is_file():
            parser.error(f"{args.base} holds no lbproxy package")
        missing = [name for name in STEERING_MODULES if not (args.base / "lbproxy" / name).is_file()]
        if args.listener != "plain" and missing:
            parser.error(
                f"--listener {args.listener} needs routing and persistence (issue #15), which {args.base} "
                f"lacks (no lbproxy/{', lbproxy/'.join(missing)}): only --listener plain can be counted there"
            )
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 1
    what = f"{args.request} request, {args.listener} listener"
    here = per_request(REPO, args.request, args.listener)
    print(f"{REPO} ({build_of(REPO)}): {here:,.0f} instructions per request ({what})")
    if args.pure:
        pure = per_request(REPO, args.request, args.listener, pure=True)
        print(f"{REPO} (pure): {pure:,.0f} instructions per request; the build above {here / pure - 1:+.1%}")
    if args.base is not None:
        base = per_request(args.base.resolve(), args.request, args.listener)
        print(
            f"{args.base} ({build_of(args.base.resolve())}): {base:,.0f} instructions per request; "
            f"this checkout {here / base - 1:+.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
