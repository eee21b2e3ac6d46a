"""Requests/s of lbproxy with 1 and with 2 worker processes (`lbproxy run --workers N`), side by side.

One nginx worker answers a 12-byte body; wrk (two threads) drives lbproxy L7 with each worker count
in turn, interleaved over several rounds, and the medians are reported with the CPU time the whole
lbproxy process tree spent per request. Nothing is pinned here: the workers need every core, so the
load generator and the back-end share them too, and on a 2-core machine the second worker competes
with wrk and nginx: read the ratio, not the absolute figures. So each run also says where the
machine's cores went while it lasted (from /proc: lbproxy's process tree, wrk, nginx, the rest of the
machine, idle), which is where a second worker's share goes when it does not go to lbproxy.

    python benchmarks/workers.py [--rounds 3] [--seconds 5] [--connections 100]

Needs nginx and wrk (Debian: apt-get install nginx-light wrk). Prints a markdown table and writes it
to benchmarks/results/workers-<date>.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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


class Run(NamedTuple):
    """One wrk run: requests/s, lbproxy's CPU per request, and the cores each party used meanwhile."""

    rps: float
    cpu_us: float
    cores: dict[str, float]  # lbproxy, wrk, nginx, other (the rest of the machine), idle: CPU-s per s


def machine_ticks() -> tuple[int, int]:
    """The whole machine's busy and idle clock ticks so far, all cores (/proc/stat)."""
    fields = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields[:8]) - idle, idle


def run_wrk(port: int, seconds: int, connections: int, pid: int, nginx: int) -> Run:
    """Two wrk threads (the workers need both cores); CPU of the whole lbproxy process tree, and
    where the machine's cores went meanwhile: where a second worker's share went if not to lbproxy."""
    before = cpu_seconds(pid), cpu_seconds(nginx), resource.getrusage(resource.RUSAGE_CHILDREN), machine_ticks()
    started = time.monotonic()
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wall = time.monotonic() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, the only child waited for meanwhile
    busy, idle = machine_ticks()
    tick = os.sysconf("SC_CLK_TCK")
    lbproxy = cpu_seconds(pid) - before[0]
    cores = {
        "lbproxy": lbproxy / wall,
        "wrk": (children.ru_utime + children.ru_stime - before[2].ru_utime - before[2].ru_stime) / wall,
        "nginx": (cpu_seconds(nginx) - before[1]) / wall,
        "idle": (idle - before[3][1]) / tick / wall,
    }
    cores["other"] = max(0.0, (busy - before[3][0]) / tick / wall - cores["lbproxy"] - cores["wrk"] - cores["nginx"])
    result = parse_wrk(out, lbproxy)
    return Run(result.rps, result.cpu_us, cores)


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
        results: dict[int, list[Run]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for count, port in ports.items():
                results[count].append(run_wrk(port, args.seconds, args.connections, trees[count].pid, processes[0].pid))
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
    one = statistics.median(run.rps for run in results[1])
    parties = ("lbproxy", "wrk", "nginx", "other", "idle")
    lines = [
        f"lbproxy L7, small keep-alive responses, wrk -t2 -c{args.connections} -d{args.seconds}s, median of "
        f"{args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, nothing pinned. "
        "Cores: the CPU time each used per second of the run (lbproxy: the whole process tree; other: the rest "
        "of the machine's busy time; idle: what no one used), medians.",
        "",
        "| workers | requests/s | x 1 worker | CPU µs/request (all processes) | "
        + " | ".join(f"cores: {party}" for party in parties)
        + " |",
        "|---|---|---|---|" + "---|" * len(parties),
    ]
    for count in (1, 2):
        rps = statistics.median(run.rps for run in results[count])
        cpu = statistics.median(run.cpu_us for run in results[count])
        cores = [statistics.median(run.cores[party] for run in results[count]) for party in parties]
        lines.append(
            f"| {count} | {rps:,.0f} | {rps / one:.2f} | {cpu:.1f} | "
            + " | ".join(f"{core:.2f}" for core in cores)
            + " |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"workers-{time.strftime('%Y-%m-%d')}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
