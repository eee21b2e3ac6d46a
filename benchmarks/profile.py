"""`make profile`: where lbproxy spends its CPU in the keep-alive scenario, sampled by py-spy.

    python benchmarks/profile.py [--seconds 10] [--rate 250] [--connections 50] [--no-native]

The macro benchmark's back-ends (one nginx, four `server` blocks) and lbproxy alone on its own core,
with wrk driving small keep-alive requests through it, as in the keep-alive scenario of
`make bench`. While wrk runs, py-spy records lbproxy twice in a row: once as a flame graph
(benchmarks/results/profile-DATE.svg, open it in a browser) and once as raw collapsed stacks, from
which benchmarks/results/profile-DATE.txt lists the top functions by self time (the frame that was
running) and by total time (on the stack). `--native` sampling shows time spent inside uvloop,
httptools and the interpreter's C code too; it falls back to Python frames only where py-spy cannot
unwind native frames.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    DEBIAN_PACKAGES,
    LBPROXY_HTTP,
    Processes,
    cores,
    cpu_seconds,
    find_tool,
    free_port,
    lbproxy_command,
    lbproxy_servers,
    missing_tools,
    parse_wrk,
    pinned,
    run_wrk,
    wait_listening,
)
from macro import backend_nginx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOP = 25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="seconds of each py-spy recording")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--no-native", action="store_true", help="Python frames only")
    args = parser.parse_args()
    missing = missing_tools()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if missing or not Path(py_spy).exists():
        print(
            f"needs {', '.join(missing) or 'py-spy'}: {DEBIAN_PACKAGES}; py-spy is in the bench extra", file=sys.stderr
        )
        return 2
    nginx = find_tool("nginx")
    assert nginx is not None
    load_core, proxy_core = cores()
    date = time.strftime("%Y-%m-%d")
    RESULTS.mkdir(exist_ok=True)
    svg, text = RESULTS / f"profile-{date}.svg", RESULTS / f"profile-{date}.txt"
    work = Path(tempfile.mkdtemp(prefix="lbproxy-profile-"))
    work.chmod(0o755)
    try:
        backends = [free_port() for _ in range(4)]
        port = free_port()
        (work / "files").mkdir()
        (work / "backend.conf").write_text(backend_nginx(work, backends))
        (work / "lbproxy.yaml").write_text(LBPROXY_HTTP.format(port=port, servers=lbproxy_servers(backends)))
        with Processes() as processes:
            processes.start(
                "backend",
                [nginx, "-p", str(work), "-e", str(work / "startup.err"), "-c", str(work / "backend.conf")],
                load_core,
            )
            pid = processes.start("lbproxy", lbproxy_command(work / "lbproxy.yaml"), proxy_core, work / "lbproxy.out")
            for listening in [*backends, port]:
                wait_listening(listening)
            url = f"http://127.0.0.1:{port}/"
            run_wrk(url, 2, args.connections, load_core, None)  # warm up: upstream connections open
            wrk = find_tool("wrk")
            assert wrk is not None
            duration = 2 * args.seconds + 4
            before = cpu_seconds(pid)
            load = subprocess.Popen(
                [*pinned(load_core), wrk, "-t1", f"-c{args.connections}", f"-d{duration}s", "--latency", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            try:
                time.sleep(1)
                native = not args.no_native
                native = record(py_spy, pid, args, "flamegraph", svg, native)
                raw = work / "raw.txt"
                record(py_spy, pid, args, "raw", raw, native)
                out, _ = load.communicate(timeout=duration + 60)
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait(timeout=10)
            result = parse_wrk(out, cpu_seconds(pid) - before)
            summary = (
                f"lbproxy under py-spy ({args.rate} Hz, {'native and Python' if native else 'Python'} frames), "
                f"small keep-alive responses, wrk -t1 -c{args.connections}, {date}: "
                f"{result.rps:,.0f} requests/s and {result.cpu_us:.1f} µs of lbproxy CPU per request while sampled "
                f"(py-spy pauses the process for each sample: compare shares, not absolute speed)."
            )
            text.write_text(summary + "\n\n" + top_functions(raw.read_text()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text.read_text())
    print(f"flame graph: {svg.relative_to(HERE.parent)}; top functions: {text.relative_to(HERE.parent)}")
    return 0


def record(py_spy: str, pid: int, args: argparse.Namespace, kind: str, output: Path, native: bool) -> bool:
    """One py-spy recording of `pid`; returns whether native frames were recorded."""
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate", str(args.rate)]
    command += ["--format", kind, "--output", str(output), "--function"]
    if native:
        done = subprocess.run([*command, "--native"], capture_output=True, text=True, check=False, timeout=120)
        if done.returncode == 0 and output.exists() and output.stat().st_size:
            return True
        print(f"py-spy --native failed ({done.stderr.strip()[-300:]}); Python frames only", file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"py-spy failed: {done.stderr.strip()}")
    return False


def top_functions(raw: str, top: int = TOP) -> str:
    """The top functions of py-spy's collapsed stacks (`frame;frame;...;leaf COUNT` per line)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if frame and not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return "no samples\n"
    lines = [f"{samples} samples. Top {top} functions by self time:", "", "  self %   total %  function"]
    for frame, count in own.most_common(top):
        lines.append(f"{100 * count / samples:7.1f}  {100 * total[frame] / samples:8.1f}  {frame}")
    lines += ["", f"Top {top} Python functions by total time (on the stack):", "", "  total %   self %  function"]
    python = [(frame, count) for frame, count in total.most_common() if ".py:" in frame and count < samples]
    for frame, count in python[:top]:
        lines.append(f"{100 * count / samples:8.1f}  {100 * own[frame] / samples:7.1f}  {frame}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
