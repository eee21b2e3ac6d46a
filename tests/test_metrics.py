"""`/metrics` of a running lbproxy: names, labels and values after known traffic, checked by the real tools.

Values are read back through prometheus-client's own parsers (text and OpenMetrics); `promtool check
metrics` lints the exposition; and a real Prometheus server scrapes lbproxy every second and sees a
killed back-end's `lbproxy_server_up` go to 0 through its HTTP API. The tests that need Debian's
prometheus package skip, saying so, when its binaries are missing (.ci/system-deps installs them).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.runtime import Runtime
from tests.support import LOCALHOST, Backend, admin_farm, eventually, free_port, get, port_of, running

CONFIG = admin_farm(pool="{health}\n")
HTTP_CHECK = "    health: {{type: http, path: /health, interval: {interval}, timeout: 500ms, fall: 2, rise: 2}}"

# The contract of issue #5: every sample name, its family's type and its labels.
SERVER = ("pool", "server")
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "lbproxy_server_up": ("gauge", SERVER),
    "lbproxy_server_admin_state": ("gauge", (*SERVER, "state")),
    "lbproxy_server_active_connections": ("gauge", SERVER),
    "lbproxy_server_connections_total": ("counter", SERVER),
    "lbproxy_server_responses_total": ("counter", (*SERVER, "code")),
    "lbproxy_server_connect_failures_total": ("counter", SERVER),
    "lbproxy_server_sent_bytes_total": ("counter", SERVER),
    "lbproxy_server_received_bytes_total": ("counter", SERVER),
    "lbproxy_server_health_checks_total": ("counter", (*SERVER, "result")),
    "lbproxy_server_health_check_duration_seconds": ("gauge", SERVER),
    "lbproxy_server_transitions_total": ("counter", (*SERVER, "to")),
    "lbproxy_server_last_transition_timestamp_seconds": ("gauge", SERVER),
    "lbproxy_pool_servers_up": ("gauge", ("pool",)),
    "lbproxy_pool_tier": ("gauge", ("pool", "tier")),
    "lbproxy_pool_failovers_total": ("counter", ("pool",)),
    "lbproxy_pool_retries_total": ("counter", ("pool",)),
    "lbproxy_listener_active_connections": ("gauge", ("listener",)),
    "lbproxy_listener_requests_total": ("counter", ("listener",)),
    "lbproxy_listener_responses_total": ("counter", ("listener", "code")),
    "lbproxy_listener_request_duration_seconds_bucket": ("histogram", ("listener", "le")),
    "lbproxy_listener_request_duration_seconds_count": ("histogram", ("listener",)),
    "lbproxy_listener_request_duration_seconds_sum": ("histogram", ("listener",)),
    "lbproxy_config_reloads_total": ("counter", ("result",)),
    "lbproxy_config_last_reload_successful": ("gauge", ()),
    "process_cpu_seconds_total": ("counter", ()),
    "process_resident_memory_bytes": ("gauge", ()),
    "process_open_fds": ("gauge", ()),
    "process_start_time_seconds": ("gauge", ()),
}
CODES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Scrape:
    """One exposition, parsed: `scrape("name", label=value, ...)` is a sample's value."""

    def __init__(self, text: str, openmetrics: bool = False) -> None:
        self.text = text
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}  # sample name -> its family's type
        self.labels: dict[str, set[tuple[str, ...]]] = {}  # sample name -> the label names it comes with
        parse = openmetrics_families if openmetrics else text_string_to_metric_families
        for family in parse(text):
            for sample in family.samples:
                self.values[sample.name, frozenset(sample.labels.items())] = sample.value
                self.types[sample.name] = family.type
                self.labels.setdefault(sample.name, set()).add(tuple(sorted(sample.labels)))

    def __call__(self, name: str, **labels: str) -> float:
        return self.values[name, frozenset(labels.items())]

    def all(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (sample, labels), value in self.values.items() if sample == name}


def admin_url(runtime: Runtime) -> str:
    bound = runtime.bound["admin"]
    return f"http://{bound.host}:{bound.port}"


async def scrape(session: aiohttp.ClientSession, runtime: Runtime) -> Scrape:
    async with session.get(f"{admin_url(runtime)}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await response.text())


async def scrape_until(
    session: aiohttp.ClientSession, runtime: Runtime, check: Callable[[Scrape], bool], what: str, timeout: float = 5.0
) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        seen = await scrape(session, runtime)
        if check(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: it comes with Debian's prometheus package (.ci/system-deps)")
    return path


async def test_counters_after_known_traffic(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, health="") as lb,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(6):
            assert (await get(port_of(lb), b"/x")).status == 200
        web = lb.listeners["web"]
        await eventually(lambda: not web.connections, what="the clients' connections to close")
        metrics = await scrape(session, lb)

        for name, (kind, labels) in CONTRACT.items():
            assert name in metrics.types, f"{name} is missing"
            assert metrics.types[name] == kind, name
            assert metrics.labels[name] == {tuple(sorted(labels))}, name

        for server, backend in (("a", a), ("b", b)):
            names = {"pool": "farm", "server": server}
            assert metrics("lbproxy_server_connections_total", **names) == 3
            for code in CODES:
                assert metrics("lbproxy_server_responses_total", **names, code=code) == (3 if code == "2xx" else 0)
            assert metrics("lbproxy_server_up", **names) == 1
            assert metrics("lbproxy_server_active_connections", **names) == 0
            assert metrics("lbproxy_server_connect_failures_total", **names) == 0
            # Bytes each way, exactly: what the back-end received, and the three answers it gave.
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + server.encode()
            assert metrics("lbproxy_server_sent_bytes_total", **names) == sum(len(raw) for raw in backend.raw) > 0
            assert metrics("lbproxy_server_received_bytes_total", **names) == 3 * len(answer)
            assert metrics("lbproxy_server_health_checks_total", **names, result="success") == 0
            assert metrics("lbproxy_server_transitions_total", **names, to="down") == 0
            assert metrics("lbproxy_server_last_transition_timestamp_seconds", **names) == 0
            assert metrics("lbproxy_server_admin_state", **names, state="enabled") == 1
        assert metrics("lbproxy_pool_servers_up", pool="farm") == 2
        assert metrics("lbproxy_pool_retries_total", pool="farm") == 0
        assert metrics("lbproxy_pool_failovers_total", pool="farm") == 0

        assert metrics("lbproxy_listener_requests_total", listener="web") == 6
        assert metrics("lbproxy_listener_connections_total", listener="web") == 6
        assert metrics("lbproxy_listener_active_connections", listener="web") == 0
        for code in CODES:
            assert metrics("lbproxy_listener_responses_total", listener="web", code=code) == (6 if code == "2xx" else 0)
        assert metrics("lbproxy_listener_request_duration_seconds_count", listener="web") == 6
        assert 0 < metrics("lbproxy_listener_request_duration_seconds_sum", listener="web") < 6 * 5
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for labels, value in metrics.all("lbproxy_listener_request_duration_seconds_bucket").items()
        )
        assert buckets[-1] == (float("inf"), 6)
        counts = [value for _, value in buckets]
        assert counts == sorted(counts)  # cumulative
        assert metrics("lbproxy_config_reloads_total", result="success") == 0
        assert metrics("lbproxy_config_reloads_total", result="failure") == 0
        assert metrics("lbproxy_config_last_reload_successful") == 1
        tiers = ("primaries", "primaries+backups", "backups", "backup_pool", "none")
        assert [metrics("lbproxy_pool_tier", pool="farm", tier=tier) for tier in tiers] == [1, 0, 0, 0, 0]
        assert metrics("process_open_fds") > 0
        assert metrics("process_resident_memory_bytes") > 0

        # The admin state is one-hot, and follows drain and disable.
        write = {"X-Lbproxy-Admin": "1"}  # a write without a token, on loopback
        async with session.post(f"{admin_url(lb)}/api/v1/pools/farm/servers/a/drain", headers=write) as response:
            assert response.status == 200
        async with session.post(f"{admin_url(lb)}/api/v1/pools/farm/servers/b/disable", headers=write) as response:
            assert response.status == 200
        metrics = await scrape(session, lb)
        for server, current in (("a", "draining"), ("b", "disabled")):
            for state in ("enabled", "draining", "disabled"):
                value = metrics("lbproxy_server_admin_state", pool="farm", server=server, state=state)
                assert value == (1 if state == current else 0), (server, state)
            assert metrics("lbproxy_server_up", pool="farm", server=server) == 1  # health is apart
        assert metrics("lbproxy_pool_servers_up", pool="farm") == 2
        # Nothing left to serve, and no backup: the tier says so, and it is no failover.
        assert [metrics("lbproxy_pool_tier", pool="farm", tier=tier) for tier in tiers] == [0, 0, 0, 0, 1]
        assert metrics("lbproxy_pool_failovers_total", pool="farm") == 0


async def test_health_checks_and_transitions_after_a_server_goes_down(tmp_path: Path) -> None:
    health = HTTP_CHECK.format(interval="100ms")
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, health=health) as lb,
        aiohttp.ClientSession() as session,
    ):
        checked = await scrape_until(
            session,
            lb,
            lambda m: all(
                m("lbproxy_server_health_checks_total", pool="farm", server=s, result="success") for s in "ab"
            ),
            "a successful probe of each server",
        )
        assert checked("lbproxy_server_health_check_duration_seconds", pool="farm", server="a") > 0
        before = time.time()
        await a.stop()
        metrics = await scrape_until(
            session, lb, lambda m: m("lbproxy_server_up", pool="farm", server="a") == 0, "a to go down"
        )
        a_ = {"pool": "farm", "server": "a"}
        b_ = {"pool": "farm", "server": "b"}
        assert metrics("lbproxy_server_up", **b_) == 1
        assert metrics("lbproxy_pool_servers_up", pool="farm") == 1
        assert metrics("lbproxy_server_transitions_total", **a_, to="down") == 1
        assert metrics("lbproxy_server_transitions_total", **a_, to="up") == 0
        assert metrics("lbproxy_server_transitions_total", **b_, to="down") == 0
        assert before <= metrics("lbproxy_server_last_transition_timestamp_seconds", **a_) <= time.time()
        assert metrics("lbproxy_server_last_transition_timestamp_seconds", **b_) == 0
        assert metrics("lbproxy_server_health_checks_total", **a_, result="failure") >= 2  # fall 2
        assert metrics("lbproxy_server_health_checks_total", **a_, result="success") >= 1
        assert metrics("lbproxy_server_health_checks_total", **b_, result="failure") == 0
        assert 0 < metrics("lbproxy_server_health_check_duration_seconds", **b_) < 0.5
        assert metrics("lbproxy_server_admin_state", **a_, state="enabled") == 1  # down is not an admin state


async def test_connect_failures_and_retries(tmp_path: Path) -> None:
    closed = f"{LOCALHOST}:{free_port()}"  # nothing listens there: connections are refused
    async with (
        Backend("b") as b,
        running(CONFIG, tmp_path, a=closed, b=b.address, health="") as lb,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(4):
            response = await get(port_of(lb))
            assert (response.status, response.body) == (200, b"b")
        metrics = await scrape(session, lb)
        failures = metrics("lbproxy_server_connect_failures_total", pool="farm", server="a")
        assert failures >= 1
        assert metrics("lbproxy_pool_retries_total", pool="farm") == failures  # each went on to b
        assert metrics("lbproxy_server_connect_failures_total", pool="farm", server="b") == 0
        assert metrics("lbproxy_server_responses_total", pool="farm", server="b", code="2xx") == 4
        assert metrics("lbproxy_listener_responses_total", listener="web", code="2xx") == 4
        assert metrics("lbproxy_server_received_bytes_total", pool="farm", server="a") == 0


async def test_openmetrics_on_request(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, health="") as lb,
        aiohttp.ClientSession() as session,
    ):
        await get(port_of(lb))
        async with session.get(f"{admin_url(lb)}/metrics", headers={"Accept": OPENMETRICS}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
            text = await response.text()
        assert text.endswith("# EOF\n")
        metrics = Scrape(text, openmetrics=True)
        assert metrics("lbproxy_listener_requests_total", listener="web") == 1
        assert metrics("lbproxy_server_up", pool="farm", server="a") == 1
        assert metrics("lbproxy_listener_request_duration_seconds_count", listener="web") == 1
        assert set(CONTRACT) <= set(metrics.types)
        # The plain text format is the default, and has no EOF marker.
        plain = await scrape(session, lb)
        assert "# EOF" not in plain.text


LARGE = """
admin:
  bind: 127.0.0.1:0
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    servers:
{servers}
"""


async def test_a_large_farm_is_scraped_whole(tmp_path: Path) -> None:
    """300 servers, each with its own figures: every one is in the scrape, with its own.

    No server is ever contacted (no probes, no traffic): their addresses are only labels here.
    """
    count = 300
    servers = "\n".join(f"      - {{name: s{i}, address: '127.0.0.1:{20000 + i}'}}" for i in range(count))
    async with running(LARGE, tmp_path, servers=servers) as lb, aiohttp.ClientSession() as session:
        farm = lb.pools["farm"]
        for i, server in enumerate(farm.servers):
            server.requests = 1000 + i
            server.sent_bytes = 10**12 + i
            server.responses[2] = i
            server.responses[5] = i % 7
            server.checks[1] = 3 * i
            server.transitions["down"] = i % 3
        for server in farm.servers[::10]:
            lb.drain(server)
        metrics = await scrape(session, lb)
    assert len(metrics.all("lbproxy_server_up")) == count
    for i in range(count):
        names = {"pool": "farm", "server": f"s{i}"}
        assert metrics("lbproxy_server_connections_total", **names) == 1000 + i
        assert metrics("lbproxy_server_sent_bytes_total", **names) == 10**12 + i
        assert metrics("lbproxy_server_responses_total", **names, code="2xx") == i
        assert metrics("lbproxy_server_responses_total", **names, code="5xx") == i % 7
        assert metrics("lbproxy_server_health_checks_total", **names, result="success") == 3 * i
        assert metrics("lbproxy_server_transitions_total", **names, to="down") == i % 3
        drained = i % 10 == 0
        assert metrics("lbproxy_server_admin_state", **names, state="draining") == (1 if drained else 0)
        assert metrics("lbproxy_server_admin_state", **names, state="enabled") == (0 if drained else 1)
    assert metrics("lbproxy_pool_servers_up", pool="farm") == count


class HeldCollector:
    """A collector that holds the encoding of a scrape until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread: threading.Thread | None = None

    def collect(self) -> Iterator[Metric]:
        self.thread = threading.current_thread()
        self.entered.set()
        self.release.wait(timeout=5)
        return iter(())


async def test_the_loop_serves_while_a_scrape_is_encoded(tmp_path: Path) -> None:
    """Issue #14: the exposition is encoded off the event loop, from figures read on it at the start."""
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, health="") as lb,
        aiohttp.ClientSession() as session,
    ):
        held = HeldCollector()
        lb.registry.register(held)
        try:
            scraping = asyncio.ensure_future(scrape(session, lb))
            await eventually(held.entered.is_set, what="the scrape to be encoding")
            # While it is: a request through the proxy, and another call to the admin server.
            assert (await asyncio.wait_for(get(port_of(lb)), timeout=5)).status == 200
            async with session.get(f"{admin_url(lb)}/healthz") as response:
                assert response.status == 200
            assert not scraping.done()
            held.release.set()
            metrics = await asyncio.wait_for(scraping, timeout=5)
        finally:
            held.release.set()
            lb.registry.unregister(held)
        assert held.thread is not threading.main_thread()
        assert lb.listeners["web"].requests == 1
        # Read when the scrape began: the request made during its encoding is not in it.
        assert metrics("lbproxy_listener_requests_total", listener="web") == 0
        assert sum(metrics("lbproxy_server_connections_total", pool="farm", server=s) for s in "ab") == 0
        assert (await scrape(session, lb))("lbproxy_listener_requests_total", listener="web") == 1


async def test_promtool_finds_nothing_to_complain_about(tmp_path: Path) -> None:
    promtool = binary("promtool")
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, health=HTTP_CHECK.format(interval="100ms")) as lb,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(3):
            await get(port_of(lb))
        await scrape_until(
            session,
            lb,
            lambda m: m("lbproxy_server_health_checks_total", pool="farm", server="a", result="success") > 0,
            "a probe",
        )
        text = (await scrape(session, lb)).text
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(text.encode()), timeout=30)
    assert (process.returncode, out.decode(), err.decode()) == (0, "", "")


PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: lbproxy
    static_configs:
      - targets: ["{target}"]
"""


async def query(session: aiohttp.ClientSession, prometheus: str, promql: str) -> list[float] | None:
    """The values of an instant query through Prometheus's HTTP API; None while Prometheus is starting
    (not listening yet, or 503 until its storage is open)."""
    try:
        async with session.get(f"{prometheus}/api/v1/query", params={"query": promql}) as response:
            if response.status == 503:
                return None
            assert response.status == 200, await response.text()
            body = await response.json()
    except aiohttp.ClientConnectionError:
        return None
    assert body["status"] == "success", body
    return [float(item["value"][1]) for item in body["data"]["result"]]


async def test_a_real_prometheus_sees_a_server_go_down(tmp_path: Path) -> None:
    executable = binary("prometheus")
    health = HTTP_CHECK.format(interval="200ms")
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, health=health) as lb,
        aiohttp.ClientSession() as session,
    ):
        bound = lb.bound["admin"]
        config = tmp_path / "prometheus.yml"
        config.write_text(PROMETHEUS_CONFIG.format(target=f"{bound.host}:{bound.port}"))
        port = free_port()
        prometheus = f"http://{LOCALHOST}:{port}"
        log = tmp_path / "prometheus.log"  # kept as an artefact: what Prometheus said
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                executable,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={LOCALHOST}:{port}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        try:

            async def until(promql: str, check: Callable[[list[float]], bool], what: str) -> None:
                deadline = time.monotonic() + 20  # Prometheus starts in ~1 s and scrapes every second
                while True:
                    if process.returncode is not None:
                        raise AssertionError(f"prometheus exited ({process.returncode}): {log.read_text()}")
                    seen = await query(session, prometheus, promql)
                    if seen is not None and check(seen):
                        return
                    if time.monotonic() > deadline:
                        raise AssertionError(f"Prometheus never saw {what}: {promql} gave {seen}; {log.read_text()}")
                    await asyncio.sleep(0.2)

            await until('up{job="lbproxy"}', lambda values: values == [1], "lbproxy scraped")
            await until('lbproxy_server_up{server="a"}', lambda values: values == [1], "a up")
            await a.stop()
            await until('lbproxy_server_up{server="a"}', lambda values: values == [0], "a down")
            await until('lbproxy_server_up{server="b"}', lambda values: values == [1], "b still up")
            await until('lbproxy_pool_servers_up{pool="farm"}', lambda values: values == [1], "one server up")
            async with session.get(f"{prometheus}/api/v1/targets") as response:
                (target,) = (await response.json())["data"]["activeTargets"]
            assert (target["health"], target["lastError"]) == ("up", "")
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), timeout=10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
