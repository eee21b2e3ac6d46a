"""`make bench`: the micro-benchmarks, the macro comparison, the failover and overload runs, one command.

    python benchmarks/run.py [--quick] [--skip micro,macro,failover,overload] [--no-readme]

Writes benchmarks/results/DATE.json (everything measured, every round), DATE.md (the tables) and
DATE.png (the chart), or DATE-2.* (-3, ...) when a full run of the same day wrote DATE.* already; a
`--quick` run (`make bench QUICK=1`, a smoke test) writes DATE-quick.* so that it never replaces a
full run's files. A full run also rewrites the README's `## Performance` section with its figures.
Every process started is stopped before this exits, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import macro
import report
from harness import DEBIAN_PACKAGES, checkout_python, cpu_model, missing_tools

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
FAILOVER = HERE / "failover.py"
OVERLOAD = HERE / "overload.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (QUICK=1)")
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to leave out: micro, macro, failover, overload"
    )
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--command", default="make bench", help="the command shown in the results")
    args = parser.parse_args()
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    missing = missing_tools()
    if missing and "macro" not in skip:
        print(f"not installed: {', '.join(missing)}; as root: {DEBIAN_PACKAGES}", file=sys.stderr)
        return 2
    date = time.strftime("%Y-%m-%d")
    stem = f"{date}-quick" if args.quick else free_stem(date)
    RESULTS.mkdir(exist_ok=True)
    results: dict[str, object] = {
        "date": date,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": args.command,
        "quick": args.quick,
        "machine": machine(),
    }
    started = time.monotonic()
    if "micro" not in skip:
        print("== micro-benchmarks", file=sys.stderr, flush=True)
        results["micro"] = micro(args.quick)
    if "macro" not in skip:
        print("== macro: lbproxy, HAProxy, nginx, aiohttp", file=sys.stderr, flush=True)
        results["macro"] = macro.run(args.quick)
    if "failover" not in skip and FAILOVER.exists():
        print("== failover (benchmarks/failover.py)", file=sys.stderr, flush=True)
        results["failover"] = failover(args.quick)
    if "overload" not in skip and OVERLOAD.exists():
        print("== overload (benchmarks/overload.py)", file=sys.stderr, flush=True)
        results["overload"] = overload(args.quick)
    results["wall_seconds"] = round(time.monotonic() - started, 1)

    json_path = RESULTS / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    written = [json_path]
    if "macro" in results:
        markdown_path, png_path = RESULTS / f"{stem}.md", RESULTS / f"{stem}.png"
        markdown_path.write_text(report.markdown(results))
        report.chart(results, png_path)
        written += [markdown_path, png_path]
        if not args.quick and not args.no_readme:
            files = f"benchmarks/results/{stem}.md, .json and .png"
            report.update_readme(ROOT / "README.md", report.readme_section(results, files))
            written.append(ROOT / "README.md")
        print(markdown_path.read_text())
    print(f"wrote {', '.join(str(path.relative_to(ROOT)) for path in written)} in {results['wall_seconds']:.0f} s")
    return 0


def free_stem(date: str) -> str:
    """`date`, or `date-2`, `date-3`, ... when a full run of that day has written its files already: a
    second run on the same day never replaces the first's (a QUICK run's files are replaced)."""
    stem, number = date, 1
    while (RESULTS / f"{stem}.json").exists():
        number += 1
        stem = f"{date}-{number}"
    return stem


def machine() -> dict[str, object]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": " ".join(f"{value:.1f}" for value in os.getloadavg()),
    }


def micro(quick: bool) -> dict[str, object]:
    """Run benchmarks/micro with pytest-benchmark on this checkout's compiled build (checkout_python);
    the medians of each benchmark, and the build they ran (lbproxy.build.RUNNING in the same setting)."""
    probe = [*checkout_python(), "-c", "import lbproxy.build; print(lbproxy.build.RUNNING)"]
    build = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lbproxy-micro-") as folder:
        output = Path(folder) / "micro.json"
        command = [
            *checkout_python(),
            "-m",
            "pytest",
            str(HERE / "micro"),
            "-o",
            "python_files=bench_*.py",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--benchmark-json={output}",
            "--benchmark-columns=median,iqr,ops,rounds",
            "--benchmark-sort=name",
        ]
        if quick:
            command += ["--benchmark-max-time=0.1", "--benchmark-min-rounds=3", "--benchmark-warmup=off"]
        else:
            command += ["--benchmark-max-time=0.5", "--benchmark-warmup=on"]
        done = subprocess.run(command, cwd=ROOT, check=False, timeout=900)
        if done.returncode != 0 or not output.exists():
            raise RuntimeError(f"the micro-benchmarks failed (pytest exit status {done.returncode})")
        raw = json.loads(output.read_text())
    return {
        "benchmarks": [
            {
                "group": bench["group"],
                "name": bench["name"],
                "median_s": bench["stats"]["median"],
                "mean_s": bench["stats"]["mean"],
                "stddev_s": bench["stats"]["stddev"],
                "iqr_s": bench["stats"]["iqr"],
                "rounds": bench["stats"]["rounds"],
            }
            for bench in raw["benchmarks"]
        ],
        "python": raw["machine_info"]["python_version"],
        "build": build,
    }


def script(command: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run a benchmark script as it is: (exit status, its standard output, seconds); None and "timeout"
    when it ran past `timeout`. Its standard error's end is passed on."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException as error:
        # SIGTERM first: the scripts turn it into SystemExit and stop the back-ends and proxies they
        # started in their finally blocks.
        process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=10)
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        return None, "timeout", round(time.monotonic() - started, 1)
    sys.stderr.write(stderr[-4000:])
    return process.returncode, stdout, round(time.monotonic() - started, 1)


def failover(quick: bool) -> dict[str, object]:
    """benchmarks/failover.py (issue #4's), run as it is; its table and output kept as they come."""
    returncode, stdout, seconds = script([sys.executable, str(FAILOVER), *(["--quick"] if quick else [])], 1200)
    if returncode is None:
        return {"returncode": None, "seconds": seconds, "table": "", "output": stdout}
    table = "\n".join(line for line in stdout.splitlines() if line.startswith("|"))
    return {
        "command": " ".join(["python", "benchmarks/failover.py", *(["--quick"] if quick else [])]),
        "returncode": returncode,
        "seconds": seconds,
        "table": table,
        "output": stdout,
    }


def overload(quick: bool) -> dict[str, object]:
    """benchmarks/overload.py (issue #17's), run as it is; its figures (its --json) and output kept."""
    with tempfile.TemporaryDirectory(prefix="lbproxy-overload-") as folder:
        figures = Path(folder) / "overload.json"
        command = [sys.executable, str(OVERLOAD), "--json", str(figures), *(["--quick"] if quick else [])]
        returncode, stdout, seconds = script(command, 600)
        measured = json.loads(figures.read_text()) if returncode == 0 and figures.exists() else {}
    return {
        **measured,
        "command": " ".join(["python", "benchmarks/overload.py", *(["--quick"] if quick else [])]),
        "returncode": returncode,
        "seconds": seconds,
        "table": measured.get("table", ""),
        "output": stdout,
    }


if __name__ == "__main__":
    raise SystemExit(main())
