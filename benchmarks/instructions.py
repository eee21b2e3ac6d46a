"""Instructions per keep-alive request on the L7 hot path, counted by valgrind: steady where timings are not.

    python benchmarks/instructions.py [--request wrk|browser] [--base DIR]

Runs the request/response cycle of micro/bench_http.py (stub transports, no event loop, no kernel)
under `valgrind --tool=cachegrind` for 2,000 and for 6,000 cycles and divides the difference by
4,000, so that start-up cancels out. On this shared machine a timing of the same code moves by 15%
from one run to the next; the count moves by well under 1%, which makes it the measure for a change
of a few per cent to the Python work (which, with uvloop, is nearly all of lbproxy's user time).
It is a count, not a time: check a change that moves memory around with `make bench` as well.

`--base DIR` counts the lbproxy package of another checkout as well (`git worktree add DIR REV`),
for a before-and-after from one command.
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


def run_cycles(cycles: int, request: str) -> None:
    """The measured part: `cycles` request/response exchanges on one client and one server connection."""
    sys.path.insert(0, str(HERE / "micro"))
    import uvloop
    from bench_http import Cycle
    from conftest import BROWSER_REQUEST

    loop = uvloop.new_event_loop()
    cycle = Cycle(loop, WRK_REQUEST if request == "wrk" else BROWSER_REQUEST)
    for _ in range(cycles):
        cycle()
    assert cycle.listener.requests == cycles
    loop.close()


def count(package_root: Path, cycles: int, request: str) -> int:
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
    ]
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_request(package_root: Path, request: str) -> float:
    return (count(package_root, LONG, request) - count(package_root, SHORT, request)) / (LONG - SHORT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--request", choices=("wrk", "browser"), default="wrk", help="the request head (default wrk)")
    parser.add_argument("--base", type=Path, help="another checkout to count as well")
    parser.add_argument("--cycles", type=int, help=argparse.SUPPRESS)  # the run under valgrind
    args = parser.parse_args()
    if args.cycles is not None:
        run_cycles(args.cycles, args.request)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 1
    here = per_request(REPO, args.request)
    print(f"{REPO}: {here:,.0f} instructions per request ({args.request} request)")
    if args.base is not None:
        base = per_request(args.base.resolve(), args.request)
        print(f"{args.base}: {base:,.0f} instructions per request; this checkout {here / base - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
