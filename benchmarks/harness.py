"""What the macro benchmarks share: ports, processes pinned to cores, wrk runs and their CPU cost.

Every process a benchmark starts goes through `Processes`, which stops them all (SIGTERM, then
SIGKILL after a grace time) when its `with` block ends, whatever happened inside it. CPU time is read
from /proc for a process and its children (nginx's worker), so that the cost of a request is measured
on the proxy itself, not inferred from a load generator's view of a shared machine. Nothing here
listens anywhere but 127.0.0.1. Standard library only.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent  # the checkout these benchmarks belong to: its lbproxy runs
TOOLS = ("nginx", "haproxy", "wrk")
DEBIAN_PACKAGES = "apt-get install -y haproxy nginx-light wrk"


def find_tool(name: str) -> str | None:
    """The path of `name`; Debian keeps nginx and haproxy in /usr/sbin, off a non-root PATH."""
    found = shutil.which(name)
    if found is not None:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(folder, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


# One http listener balancing over `servers` (see lbproxy_servers): the keep-alive setting of the
# scripts that measure lbproxy alone.
LBPROXY_HTTP = """
listeners:
  - {{name: web, bind: "127.0.0.1:{port}", pool: farm}}
pools:
  farm:
    servers:
{servers}
"""


def lbproxy_servers(backends: Sequence[int]) -> str:
    """The `servers:` entries of a pool of back-ends on 127.0.0.1, named s1, s2, ..."""
    entries = (f'      - {{name: s{index}, address: "127.0.0.1:{port}"}}' for index, port in enumerate(backends, 1))
    return "\n".join(entries)


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def missing_tools(tools: Iterable[str] = TOOLS) -> list[str]:
    return [tool for tool in tools if find_tool(tool) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, deadline: float = 10.0, gone: Callable[[], str | None] | None = None) -> None:
    """Wait until 127.0.0.1:`port` accepts; `gone()`, when given, says why to stop waiting (a process died)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        why = gone() if gone is not None else None
        if why is not None:
            raise RuntimeError(why)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline:.0f} s")


def cores() -> tuple[int | None, int | None]:
    """(load core, proxy core): the load generator and back-ends on one, the proxy under test on another.

    (None, None) on a one-core machine: nothing is pinned.
    """
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 or shutil.which("taskset") is None:
        return None, None
    return available[0], available[1]


def pinned(core: int | None) -> list[str]:
    """The `taskset` prefix that runs a command on `core` (nothing when `core` is None)."""
    return ["taskset", "-c", str(core)] if core is not None else []


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (nginx's master and its worker, say)."""
    found = [pid]
    index = 0
    while index < len(found) and index < 1000:
        try:
            tasks = list(Path(f"/proc/{found[index]}/task").iterdir())
        except OSError:
            tasks = []
        for task in tasks:
            try:
                found += (int(child) for child in (task / "children").read_text().split())
            except OSError:
                pass
        index += 1
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants, all threads, from /proc."""
    ticks = 0
    for process in descendants(pid):
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended between the listing and the read
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def set_affinity(pid: int, core_set: set[int]) -> None:
    """Move every thread of `pid` and of its descendants to `core_set` (as `taskset -a -p`)."""
    for process in descendants(pid):
        try:
            threads = [int(task.name) for task in Path(f"/proc/{process}/task").iterdir()]
        except OSError:
            continue
        for thread in threads:
            try:
                os.sched_setaffinity(thread, core_set)
            except OSError:
                pass


class Processes:
    """The processes one benchmark started; all are stopped when the `with` block ends."""

    def __init__(self) -> None:
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], core: int | None, log: Path | None = None) -> int:
        """Start `argv` on `core`, its output to `log` (or nowhere); returns its pid."""
        command = [*pinned(core), *argv]
        if log is None:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            with log.open("wb") as output:
                process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        self.started[name] = process
        return process.pid

    def pid(self, name: str) -> int:
        return self.started[name].pid

    def check_alive(self) -> None:
        for name, process in self.started.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}")

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                try:
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.started.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.started.clear()


@dataclass
class WrkResult:
    """One wrk run against one target."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    transfer_mib_s: float
    errors: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0  # CPU time of the target's process(es) during the run; 0 for none
    cpu_us: float = 0.0  # ... per request

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_UNITS_MIB = {"B": 1 / 1024**2, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0, "TB": 1024.0**2}


def run_wrk(
    url: str,
    seconds: float,
    connections: int,
    core: int | None,
    pid: int | None,
    headers: Sequence[str] = (),
) -> WrkResult:
    """wrk -t1 with `--latency` against `url` for `seconds` (rounded to whole seconds); CPU is read for `pid`
    (the proxy) around the run."""
    wrk = find_tool("wrk")
    if wrk is None:
        raise RuntimeError(f"wrk is not installed (Debian: {DEBIAN_PACKAGES})")
    duration = max(1, round(seconds))  # wrk takes whole seconds
    command = [*pinned(core), wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for header in headers:
        command += ["-H", header]
    before = cpu_seconds(pid) if pid else 0.0
    done = subprocess.run([*command, url], capture_output=True, text=True, check=False, timeout=seconds + 60)
    after = cpu_seconds(pid) if pid else 0.0
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed on {url}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout, after - before if pid else 0.0)


def parse_wrk(out: str, cpu_s: float) -> WrkResult:
    requests_match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if requests_match is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests = int(requests_match.group(1))
    errors: dict[str, int] = {}
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors is not None:
        for name, value in zip(("connect", "read", "write", "timeout"), socket_errors.groups(), strict=True):
            if int(value):
                errors[name] = int(value)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx is not None:
        errors["non_2xx"] = int(non_2xx.group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB|TB)", out)
    return WrkResult(
        requests=requests,
        seconds=float(requests_match.group(2)) * _UNITS_MS[requests_match.group(3)] / 1000,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_latency(out, "50%"),
        p99_ms=_latency(out, "99%"),
        transfer_mib_s=float(transfer.group(1)) * _UNITS_MIB[transfer.group(2)] if transfer else 0.0,
        errors=errors,
        cpu_s=cpu_s,
        cpu_us=cpu_s * 1e6 / requests if requests and cpu_s else 0.0,
    )


def _latency(out: str, label: str) -> float:
    found = re.search(rf"{label}\s+([\d.]+)(us|ms|s|m)\b", out)
    if found is None:
        return 0.0
    return float(found.group(1)) * _UNITS_MS[found.group(2)]


def haproxy_stat(stats_socket: Path) -> list[dict[str, str]]:
    """HAProxy's `show stat` from its stats socket: one mapping of column to value per proxy and server."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    header, *rows = b"".join(chunks).decode().splitlines()
    columns = header.lstrip("# ").split(",")
    return [dict(zip(columns, row.split(","), strict=False)) for row in rows]


def haproxy_ssl_sessions(stats_socket: Path) -> tuple[int, int]:
    """(full handshakes, resumed ones) that HAProxy's frontends have completed so far: `ssl_sess`
    counts the new sessions (full handshakes), `ssl_reused_sess` the resumed ones."""
    full = resumed = 0
    for values in haproxy_stat(stats_socket):
        if values.get("svname") == "FRONTEND":
            full += int(values.get("ssl_sess") or 0)
            resumed += int(values.get("ssl_reused_sess") or 0)
    return full, resumed


def checkout_python(root: Path = REPO, pure: bool = False) -> list[str]:
    """This Python (and its venv), importing lbproxy from the checkout at `root`: its compiled build
    (issue #19), or its pure-Python one with `pure` (LBPROXY_PURE=1; 0 otherwise, whatever the caller's
    environment says).

    The venv holds an editable install of one checkout, and `python -m` or `-c` put the working
    directory first on sys.path: `-P` leaves the working directory out and PYTHONPATH puts `root`
    before site-packages (the editable install's finder comes after both), so `root` wins, wherever
    the script was started from.
    """
    return ["env", f"PYTHONPATH={root}", f"LBPROXY_PURE={1 if pure else 0}", sys.executable, "-P"]


def lbproxy_command(config: Path, root: Path = REPO, pure: bool = False) -> list[str]:
    """`lbproxy run -c config` with the package of the checkout at `root` (see checkout_python)."""
    return [*checkout_python(root, pure), "-m", "lbproxy", "run", "-c", str(config), "--log-level", "warning"]


def lbproxy_build(pid: int) -> dict[str, object]:
    """Which build of lbproxy the process `pid` runs, from the files it has mapped (/proc/PID/maps):
    "mypyc" when it loaded compiled modules of lbproxy (extensions in a folder named lbproxy), else
    "pure"; `modules`, the compiled modules loaded (mypyc's shared library of them left out), and
    `package`, the folder they came from. What the process did, not what a probe would do."""
    modules: set[str] = set()
    folders: set[str] = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        path = Path(fields[5])
        if path.parent.name == "lbproxy" and path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            folders.add(str(path.parent))
            name = path.name.split(".", 1)[0]
            if not name.endswith("__mypyc"):
                modules.add(name)
    return {
        "build": "mypyc" if folders else "pure",
        "modules": sorted(modules),
        "package": ", ".join(sorted(folders)),
    }
