"""Requests/s of lbproxy with 1 and with 2 worker processes (`lbproxy run --workers N`), side by side.

One nginx worker answers a 12-byte body; wrk (two threads) drives lbproxy L7 with each worker count
in turn, interleaved over several rounds, and the medians are reported with the CPU time the whole
lbproxy process tree spent per request. Nothing is pinned here: the workers need every core, so the
load generator and the back-end share them too, and on a 2-core machine the second worker competes
with wrk and nginx: read the ratio, not the absolute figures.

    python benchmarks/workers.py [--rounds 3] [--seconds 5] [--connections 100]

Needs nginx and wrk (Debian: apt-get install nginx-light wrk). Prints a markdown table and writes it
to benchmarks/results/workers-<date>.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    LBPROXY_HTTP,
    cpu_seconds,
    free_port,
    lbproxy_command,
    lbproxy_servers,
    missing_tools,
    parse_wrk,
    wait_listening,
)
from macro import backend_nginx


def run_wrk(port: int, seconds: int, connections: int, pid: int) -> tuple[float, float]:
    """Two wrk threads (the workers need both cores); CPU of the whole lbproxy process tree."""
    before = cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = parse_wrk(out, cpu_seconds(pid) - before)
    return result.rps, result.cpu_us


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=100)
    args = parser.parse_args()
    missing = missing_tools(("nginx", "wrk"))
    if missing:
        print(f"not installed: {', '.join(missing)} (Debian: apt-get install nginx-light wrk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lbproxy-workers-"))
    work.chmod(0o755)  # nginx's workers run as another user when started by root: they read the files
    (work / "files").mkdir()
    backend = free_port()
    ports = {1: free_port(), 2: free_port()}
    (work / "nginx.conf").write_text(backend_nginx(work, [backend]))
    processes = [subprocess.Popen(["nginx", "-c", str(work / "nginx.conf")])]
    trees: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for count, port in ports.items():
            path = work / f"lbproxy-{count}.yaml"
            path.write_text(LBPROXY_HTTP.format(port=port, servers=lbproxy_servers([backend])))
            command = [*lbproxy_command(path), "--workers", str(count)]
            trees[count] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            processes.append(trees[count])
        for port in (backend, *ports.values()):
            wait_listening(port)
        results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for count, port in ports.items():
                results[count].append(run_wrk(port, args.seconds, args.connections, trees[count].pid))
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
    one = statistics.median(rps for rps, _ in results[1])
    lines = [
        f"lbproxy L7, small keep-alive responses, wrk -t2 -c{args.connections} -d{args.seconds}s, median of "
        f"{args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, nothing pinned",
        "",
        "| workers | requests/s | x 1 worker | CPU µs/request (all processes) |",
        "|---|---|---|---|",
    ]
    for count in (1, 2):
        rps = statistics.median(rps for rps, _ in results[count])
        cpu = statistics.median(cpu for _, cpu in results[count])
        lines.append(f"| {count} | {rps:,.0f} | {rps / one:.2f} | {cpu:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"workers-{time.strftime('%Y-%m-%d')}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
