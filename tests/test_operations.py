"""Operations: reload in place, admin state across restarts, graceful shutdown and the signals.

Reload tests run lbproxy in-process (`running()`) and rewrite its config file before calling
`Runtime.reload()` or `POST /api/v1/reload`; to hold a reload half way, a test stands in for the
system resolver with one that answers on cue, and to hold the state file's write, for `os.fsync`.
Signal tests run `python -m lbproxy run -c FILE` as a
subprocess, read the bound ports from its standard output and its log from a file, and always kill it
in a `finally`. Every wait is on a condition with a deadline; every load is bounded in time and count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy import config
from lbproxy.admin import pool_state
from lbproxy.config import Address
from lbproxy.pool import WEIGHT_SCALE, AdminState
from lbproxy.runtime import Runtime
from tests.support import (
    LOCALHOST,
    Backend,
    Client,
    Request,
    Responder,
    admin_farm,
    answers_when,
    ctl,
    eventually,
    get,
    port_of,
    running,
)

GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
HEALTH = "{type: http, path: /health, interval: 100ms, timeout: 1s, rise: 1, fall: 1}"


# -- helpers ----------------------------------------------------------------------------------------


def write_config(directory: Path, yaml_text: str, **substitutions: object) -> None:
    """Replace the config file that `running()` wrote in `directory` (same dedent and `{name}` rules)."""
    (directory / "lbproxy.yaml").write_text(textwrap.dedent(yaml_text).format(**substitutions))


@dataclass
class Health:
    """A switch for a back-end's /health answer."""

    ok: bool = True


def farm_server(name: str, health: Health | None = None) -> Responder:
    """Answers 200 with its name; /health answers 200 or 503 as `health` says."""

    def respond(request: Request, transport: asyncio.Transport) -> None:
        if request.target == b"/health" and health is not None and not health.ok:
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            return
        body = name.encode()
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return respond


def traffic(backend: Backend) -> list[Request]:
    """What the back-end received from clients, health probes left out."""
    return [request for request in backend.requests if request.target != b"/health"]


@dataclass
class Load:
    """Counts of a keep-alive GET load: responses by status, and every client-side error."""

    done: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


async def keep_alive_load(port: int, clients: int, seconds: float, limit: int, load: Load) -> None:
    """`clients` keep-alive connections sending GETs one after another, for `seconds` or `limit` each."""
    until = time.monotonic() + seconds

    async def one() -> None:
        try:
            client = await Client.connect(port)
        except OSError as error:
            load.errors.append(f"connect: {error!r}")
            return
        try:
            for _ in range(limit):
                if time.monotonic() >= until:
                    break
                await client.send(GET)
                response = await client.response(timeout=5.0)
                load.done += 1
                load.statuses[response.status] = load.statuses.get(response.status, 0) + 1
                if response.status != 200:
                    load.errors.append(f"status {response.status}: {response.body[:100]!r}")
        except (OSError, TimeoutError) as error:
            load.errors.append(f"after {load.done} responses: {error!r}")
        finally:
            await client.close()

    await asyncio.gather(*(one() for _ in range(clients)))


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, what: str = "condition") -> None:
    """`eventually` for a check that needs I/O (an admin API call)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def refused(port: int) -> bool:
    """Whether a new connection to `port` is refused (an accepted one is closed at once)."""
    try:
        _, writer = await asyncio.open_connection(LOCALHOST, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return False


def admin_url(runtime: Runtime) -> str:
    bound = runtime.bound["admin"]
    return f"http://{bound.host}:{bound.port}"


async def reload_counts(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """`lbproxy_config_reloads_total` by result, and `last_ok`: lbproxy_config_last_reload_successful."""
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "lbproxy_config_reloads":
            for sample in family.samples:
                if sample.name == "lbproxy_config_reloads_total":
                    counts[sample.labels["result"]] = sample.value
        elif family.name == "lbproxy_config_last_reload_successful":
            counts["last_ok"] = family.samples[0].value
    return counts


# -- reload: listeners and servers under load -------------------------------------------------------

BEFORE = """
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
  - name: old
    bind: 127.0.0.1:0
    pool: slow
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "{b}"}}
  slow:
    servers:
      - {{name: s, address: "{s}"}}
"""

AFTER = """
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
  - name: new
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: c, address: "{c}"}}
"""


async def test_reload_adds_and_removes_servers_and_listeners_under_load(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with (
        Backend("a") as a,
        Backend("b") as b,
        Backend("c") as c,
        Backend("s", respond=answers_when(release)) as s,
        running(BEFORE, tmp_path, a=a.address, b=b.address, s=s.address) as lb,
    ):
        web, old = port_of(lb, "web"), port_of(lb, "old")
        removed = lb.pools["farm"].by_name["b"]
        # A keep-alive connection on the listener the reload removes, its request in flight.
        async with await Client.connect(old) as pending:
            await pending.send(GET)
            await eventually(lambda: len(s.requests) == 1, what="the slow request at its server")
            load = Load()
            running_load = asyncio.ensure_future(keep_alive_load(web, clients=10, seconds=2.0, limit=5000, load=load))
            try:
                await eventually(lambda: load.done >= 200, what="the load to get going")
                write_config(tmp_path, AFTER, a=a.address, c=c.address)
                assert await lb.reload() == []
                at_reload = load.done

                # The removed listener refuses new connections; the added one answers.
                assert await refused(old)
                assert "new" in lb.bound
                assert (await get(port_of(lb, "new"))).status == 200
                # The in-flight request on the removed listener completes, then its connection closes.
                release.set()
                response = await pending.response()
                assert (response.status, response.body) == (200, b"slow")
                assert await pending.closed() == b""
                # What was in flight to the removed server ends; from then on it gets nothing.
                await eventually(lambda: removed.inflight == 0, what="the removed server's requests to end")
                b_after_reload = len(b.requests)
                c_after_reload = len(c.requests)
                await running_load
            finally:
                if not running_load.done():
                    running_load.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running_load
        assert load.errors == [], load.errors[:5]
        assert load.done > at_reload + 100, (at_reload, load.done)  # the load ran on well after the reload
        assert load.statuses == {200: load.done}
        assert len(b.requests) == b_after_reload  # nothing for the removed server
        assert len(c.requests) > c_after_reload  # the added one takes its share
        assert len(a.requests) > 0
        assert lb.reloads == {"success": 1, "failure": 0}
        assert [state["name"] for state in lb.listener_states()] == ["web", "new"]


async def test_a_removed_listener_lets_go_of_its_server_connections(tmp_path: Path) -> None:
    # The in-flight request of a removed listener finishes; the connection to its server must then be
    # closed, not left in the idle stack of a listener nobody sweeps any more.
    release = asyncio.Event()
    async with (
        Backend("a") as a,
        Backend("b") as b,
        Backend("c") as c,
        Backend("s", respond=answers_when(release)) as s,
        running(BEFORE, tmp_path, a=a.address, b=b.address, s=s.address) as lb,
    ):
        async with await Client.connect(port_of(lb, "old")) as pending:
            await pending.send(GET)
            await eventually(lambda: len(s.requests) == 1, what="the slow request at its server")
            write_config(tmp_path, AFTER, a=a.address, c=c.address)
            assert await lb.reload() == []
            release.set()
            assert (await pending.response()).status == 200
            assert await pending.closed() == b""
        (upstream,) = s.transports
        await eventually(upstream.is_closing, timeout=3.0, what="lbproxy to close its connection to server s")


# -- reload: invalid files ----------------------------------------------------------------------------

WITH_ADMIN = admin_farm()

INVALID = """
admin:
  bind: 127.0.0.1:0
colour: blue
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "not an address"}}
      - {{name: c, address: "{c}"}}
"""


async def test_an_invalid_reload_keeps_the_running_config_and_is_counted(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        Backend("c") as c,
        running(WITH_ADMIN, tmp_path, a=a.address, b=b.address) as lb,
        aiohttp.ClientSession() as session,
    ):
        base = admin_url(lb)
        write_config(tmp_path, INVALID, a=a.address, c=c.address)
        problems = await lb.reload()
        assert len(problems) == 2, problems
        assert "colour: unknown key" in problems[0]
        assert "pools.farm.servers[1].address" in problems[1]
        assert "not an address" in problems[1]
        # Nothing changed: the same servers, and both still serve.
        assert [server.name for server in lb.pools["farm"].servers] == ["a", "b"]
        assert sorted([(await get(port_of(lb))).body for _ in range(4)]) == [b"a", b"a", b"b", b"b"]
        assert not c.requests

        async with session.post(f"{base}/api/v1/reload", headers={"X-Lbproxy-Admin": "1"}) as response:
            assert response.status == 400
            body = await response.json()
        assert body["error"] == "the config was refused; the running one stays"
        assert body["problems"] == problems
        assert await reload_counts(session, base) == {"success": 0.0, "failure": 2.0, "last_ok": 0.0}
        assert (await get(port_of(lb))).status == 200

        write_config(tmp_path, WITH_ADMIN.replace('"{b}"', '"{c}"'), a=a.address, c=c.address)
        async with session.post(f"{base}/api/v1/reload", headers={"X-Lbproxy-Admin": "1"}) as response:
            assert response.status == 200
            assert await response.json() == {"result": "reloaded"}
        assert await reload_counts(session, base) == {"success": 1.0, "failure": 2.0, "last_ok": 1.0}
        assert sorted([(await get(port_of(lb))).body for _ in range(4)]) == [b"a", b"a", b"c", b"c"]


UNBINDABLE = """
admin:
  bind: 127.0.0.1:0
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
  - name: taken
    bind: 127.0.0.1:{taken}
    pool: farm
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "{b}", ratio: 3}}
"""


async def test_a_reload_that_cannot_bind_changes_nothing(tmp_path: Path) -> None:
    # A valid file whose new listener cannot be bound is refused after the servers were rebuilt: the
    # running servers must not have been touched (their pool, ratio), and admin commands still work.
    with contextlib.closing(socket.socket()) as holder:
        holder.bind((LOCALHOST, 0))
        holder.listen()
        taken = holder.getsockname()[1]
        async with (
            Backend("a") as a,
            Backend("b") as b,
            running(WITH_ADMIN, tmp_path, a=a.address, b=b.address) as lb,
        ):
            server_b = lb.pools["farm"].by_name["b"]
            write_config(tmp_path, UNBINDABLE, a=a.address, b=b.address, taken=taken)
            problems = await lb.reload()
            assert len(problems) == 1
            assert f"listener taken: cannot bind 127.0.0.1:{taken}" in problems[0]
            assert lb.reloads == {"success": 0, "failure": 1}
            assert "taken" not in lb.bound
            lb.drain(server_b)  # as `lbproxy ctl drain farm b` after the refused reload
            assert {(await get(port_of(lb))).body for _ in range(4)} == {b"a"}  # the live pool heard the drain
            assert server_b.ratio == 1
            assert server_b.pool is lb.pools["farm"]


# -- reload: state that survives ----------------------------------------------------------------------

CHECKED = """
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    health: {health}
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "{b}"}}
      - {{name: c, address: "{c}"}}
"""

CHECKED_CHANGED = """
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
    retry_after: 5s
pools:
  farm:
    health: {health}
    retries: 1
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "{b}", ratio: 3}}
      - {{name: c, address: "{c}"}}
      - {{name: d, address: "{d}"}}
"""


async def test_admin_state_health_and_counters_survive_a_reload(tmp_path: Path) -> None:
    c_health = Health(ok=False)
    async with (
        Backend("a", respond=farm_server("a")) as a,
        Backend("b", respond=farm_server("b")) as b,
        Backend("c", respond=farm_server("c", c_health)) as c,
        Backend("d", respond=farm_server("d")) as d,
        running(CHECKED, tmp_path, health=HEALTH, a=a.address, b=b.address, c=c.address) as lb,
    ):
        farm = lb.pools["farm"]
        server_a, server_b, server_c = (farm.by_name[name] for name in "abc")
        await eventually(lambda: not server_c.up, what="server c to go down")
        for _ in range(4):
            assert (await get(port_of(lb))).status == 200
        assert (len(traffic(a)), len(traffic(b)), len(traffic(c))) == (2, 2, 0)
        lb.drain(server_a)
        counters_a = (server_a.requests, [*server_a.responses], server_a.sent_bytes, server_a.received_bytes)
        checks_c = list(server_c.checks)

        write_config(tmp_path, CHECKED_CHANGED, health=HEALTH, a=a.address, b=b.address, c=c.address, d=d.address)
        assert await lb.reload() == []
        farm = lb.pools["farm"]
        assert farm.retries == 1
        assert [farm.by_name[name] for name in "abc"] == [server_a, server_b, server_c]  # the same objects
        assert server_a.admin is AdminState.DRAINING
        assert (server_a.requests, server_a.responses, server_a.sent_bytes, server_a.received_bytes) == counters_a
        assert server_b.up
        assert server_b.ratio == 3
        assert not server_c.up  # down before the reload: still down, not up again until probes say so
        assert server_c.checks[0] >= checks_c[0]
        # The probes go on after the reload, and c stays down while they fail.
        await eventually(lambda: server_c.checks[0] >= checks_c[0] + 3, what="more probes of server c")
        assert not server_c.up
        await eventually(lambda: farm.by_name["d"].up, what="the added server d to come up")
        bodies = [(await get(port_of(lb))).body for _ in range(8)]
        assert set(bodies) == {b"b", b"d"}
        assert len(traffic(a)) == 2  # draining: nothing new
        assert not traffic(c)
        # The API reports what the objects hold.
        state = {server["name"]: server for server in pool_state(farm)["servers"]}
        assert state["a"]["admin"] == "draining"
        assert state["a"]["counters"]["requests"] == 2
        assert state["c"]["state"] == "down"


ONE = """
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    health: {health}
    servers:
      - {{name: a, address: "{a}"}}
"""

TWO = """
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    health: {health}
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: d, address: "{d}"}}
"""


async def test_a_server_added_by_reload_waits_for_its_first_successful_probe(tmp_path: Path) -> None:
    d_health = Health(ok=False)
    async with (
        Backend("a", respond=farm_server("a")) as a,
        Backend("d", respond=farm_server("d", d_health)) as d,
        running(ONE, tmp_path, health=HEALTH, a=a.address) as lb,
    ):
        write_config(tmp_path, TWO, health=HEALTH, a=a.address, d=d.address)
        assert await lb.reload() == []
        server_d = lb.pools["farm"].by_name["d"]
        assert not server_d.up  # health `start` unset: a server a reload adds starts down
        assert {(await get(port_of(lb))).body for _ in range(6)} == {b"a"}
        await eventually(lambda: server_d.checks[0] >= 2, what="failing probes of server d")
        assert {(await get(port_of(lb))).body for _ in range(6)} == {b"a"}
        assert not traffic(d)

        d_health.ok = True
        probes_before = len(d.requests)
        await eventually(lambda: server_d.up, what="server d to come up")
        bodies = [(await get(port_of(lb))).body for _ in range(6)]
        assert bodies.count(b"d") == 3
        first_traffic = next(i for i, request in enumerate(d.requests) if request.target != b"/health")
        assert first_traffic > probes_before  # its first successful probe came before any traffic


# -- the state file: admin state across restarts ------------------------------------------------------

STATEFUL = """
admin:
  bind: 127.0.0.1:0
state_file: {state}
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "{b}"}}
      - {{name: c, address: "{c}"}}
"""


async def test_drained_and_disabled_servers_stay_so_across_a_restart(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    state = folder / "lbproxy-state.json"
    async with Backend("a") as a, Backend("b") as b, Backend("c") as c:
        addresses = {"a": a.address, "b": b.address, "c": c.address, "state": state}
        async with running(STATEFUL, tmp_path, **addresses) as lb, aiohttp.ClientSession() as session:
            assert not state.exists()  # nothing to keep yet
            url = f"{admin_url(lb)}/api/v1/pools/farm/servers/a/drain"
            async with session.post(url, headers={"X-Lbproxy-Admin": "1"}) as response:
                assert response.status == 200
            first = state.stat().st_ino  # on disk when the API answered
            lb.disable(lb.server("farm", "b"))
            await lb.refresh()  # the write is made in a thread: wait for it, as the API does
            assert state.stat().st_ino != first  # replaced whole (rename), not rewritten in place
            assert json.loads(state.read_text()) == {
                "version": 1,
                "servers": {"farm/a": "draining", "farm/b": "disabled"},
            }
        assert os.listdir(folder) == [state.name]  # no temporary file left behind

        async with running(STATEFUL, tmp_path, **addresses) as lb:
            farm = lb.pools["farm"]
            assert farm.by_name["a"].admin is AdminState.DRAINING
            assert farm.by_name["b"].admin is AdminState.DISABLED
            assert farm.by_name["c"].admin is AdminState.ENABLED
            assert {(await get(port_of(lb))).body for _ in range(4)} == {b"c"}
            lb.enable(farm.by_name["b"])
            await lb.refresh()
            assert json.loads(state.read_text()) == {"version": 1, "servers": {"farm/a": "draining"}}
            lb.enable(farm.by_name["a"])
            await lb.refresh()
            assert json.loads(state.read_text()) == {"version": 1, "servers": {}}
        assert os.listdir(folder) == [state.name]


async def test_an_unreadable_state_file_starts_every_server_enabled(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text('{"version": 1, "servers": {"farm/a": "drain')
    async with (
        Backend("a") as a,
        Backend("b") as b,
        Backend("c") as c,
        running(STATEFUL, tmp_path, a=a.address, b=b.address, c=c.address, state=state) as lb,
    ):
        assert {server.admin for server in lb.pools["farm"].servers} == {AdminState.ENABLED}
        lb.drain(lb.server("farm", "c"))
        await lb.refresh()
        assert json.loads(state.read_text()) == {"version": 1, "servers": {"farm/c": "draining"}}


# -- the control plane: one reload at a time, built beside the live state ----------------------------------
# Where a test must hold a reload half way, it stands in for the system resolver (`config.resolve`, which
# the runtime calls in a thread) with one that waits for the test: a slow DNS answer, made on cue.

TOKEN = "control-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STALLED = "stalled.invalid"  # a name only the tests' resolver knows (RFC 6761: never a real one)

FARM = """
admin:
  bind: 127.0.0.1:0
  token: {token}
state_file: {state}
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    retries: 0
    health: {health}
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "{b}"}}
"""

FARM_AND_C = FARM + '      - {{name: c, address: "{c}"}}\n'

NO_HEALTH = "{type: none}"
PROBED = "{type: http, path: /health, interval: 100ms, timeout: 1s, rise: 1, fall: 1}"
INTERVAL = 0.1
JITTER = 0.1  # health.JITTER: one probe loop starts a probe at most every INTERVAL * (1 - JITTER)


def probes(backend: Backend) -> int:
    return sum(1 for request in backend.requests if request.target == b"/health")


def probe_loops(name: str) -> int:
    """Probe loops of `name` ("pool/server") still running in this process, live or orphaned."""
    return sum(1 for task in asyncio.all_tasks() if task.get_name() == f"health {name}" and not task.done())


class StalledResolver:
    """`config.resolve` for STALLED: waits in its thread until the test releases it, then fails with a
    resolver error or answers 127.0.0.1. Other names go to the real resolver."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self._real: Callable[[Address], str] = config.resolve

    def __call__(self, address: Address) -> str:
        if address.host != STALLED:
            return self._real(address)
        self.calls += 1
        self.entered.set()
        self.release.wait(timeout=10)
        if not self.answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return LOCALHOST


async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with session.post(url, headers=AUTH) as response:
        return response.status, await response.json()


# #9: four reloads at once used to leave probe loops on orphaned pools that shared the Server objects.


async def test_concurrent_reloads_leave_one_probe_loop_per_server_and_the_live_pool_hears_a_death(
    tmp_path: Path,
) -> None:
    # Four reloads at once used to leave probe loops on orphaned pools that shared the Server objects:
    # the probe rate tripled, and a server that died was marked down on an orphan while the live pool
    # kept sending it traffic (502s).
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(
            FARM, tmp_path, token=TOKEN, state=tmp_path / "state.json", health=PROBED, a=a.address, b=b.address
        ) as lb,
        aiohttp.ClientSession() as session,
    ):
        await lb.health.first_round()
        answers = await asyncio.gather(*(post(session, f"{admin_url(lb)}/api/v1/reload") for _ in range(4)))
        assert answers == [(200, {"result": "reloaded"})] * 4
        assert lb.reloads == {"success": 4, "failure": 0}
        assert (probe_loops("farm/a"), probe_loops("farm/b")) == (1, 1)

        # What server a sees: one probe loop starts a probe at most every 90 ms, so 20 probes take at
        # least 1.7 s (a slow machine only makes it longer); two loops would take half that.
        seen = probes(a)
        await eventually(lambda: probes(a) > seen, what="a probe after the reloads")
        started, first = time.monotonic(), probes(a)
        await eventually(lambda: probes(a) >= first + 20, timeout=10.0, what="20 more probes of a")
        elapsed = time.monotonic() - started
        assert elapsed >= 20 * INTERVAL * (1 - JITTER) - 0.3, f"20 probes of a in {elapsed:.2f}s: more than one loop"

        # Server b dies: the live pool takes it out, and nothing more goes to it.
        await b.stop()
        server_b = lb.pools["farm"].by_name["b"]
        await eventually(lambda: not server_b.up, what="server b to go down")
        responses = [await get(port_of(lb)) for _ in range(20)]
        assert [(response.status, response.body) for response in responses] == [(200, b"a")] * 20
        async with session.get(f"{admin_url(lb)}/api/v1/pools/farm") as response:
            farm = await response.json()
        assert farm["servers_available"] == 1
        assert [server["state"] for server in farm["servers"]] == ["up", "down"]


# A drain that arrived while a reload was built went to the pool being built, and was lost when the
# reload was refused.


async def test_a_drain_during_a_refused_reload_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A drain made while a reload was being built went to the pool being built; the refused reload then
    # put the server back in the live pool, whose policy had never heard of the drain: it kept sending.
    resolver = StalledResolver(answer=False)
    monkeypatch.setattr(config, "resolve", resolver)
    state = tmp_path / "state.json"
    async with (
        Backend("a") as a,
        Backend("b") as b,
        Backend("c") as c,
        running(FARM, tmp_path, token=TOKEN, state=state, health=NO_HEALTH, a=a.address, b=b.address) as lb,
        aiohttp.ClientSession() as session,
    ):
        base = admin_url(lb)
        live = lb.pools["farm"]
        server_b = live.by_name["b"]
        write_config(
            tmp_path,
            FARM_AND_C.replace('"{b}"}}', '"{b}", ratio: 3}}'),
            token=TOKEN,
            state=state,
            health=NO_HEALTH,
            a=a.address,
            b=b.address,
            c=f"{STALLED}:{c.port}",
        )
        reload = asyncio.ensure_future(post(session, f"{base}/api/v1/reload"))
        try:
            await eventually(resolver.entered.is_set, what="the reload to look up the new name")
            status, body = await post(session, f"{base}/api/v1/pools/farm/servers/b/drain")
            assert (status, body["admin"]) == (200, "draining")
        finally:
            resolver.release.set()
        status, body = await reload
        assert status == 400
        assert f"cannot resolve {STALLED!r}" in str(body["problems"])
        assert lb.reloads == {"success": 0, "failure": 1}
        # Nothing of the refused reload reached the live state; the drain did.
        assert lb.pools["farm"] is live
        assert server_b.pool is live
        assert (server_b.ratio, server_b.weight) == (1, WEIGHT_SCALE)
        assert server_b.admin is AdminState.DRAINING
        bodies = [(await get(port_of(lb))).body for _ in range(10)]
        assert bodies == [b"a"] * 10
        assert not traffic(b)
        assert json.loads(state.read_text())["servers"] == {"farm/b": "draining"}


# -- #11 and the state file: damaged, slow -----------------------------------------------------------------

DAMAGED = {
    "servers-a-list": '{"version": 1, "servers": []}',
    "servers-null": '{"version": 1, "servers": null}',
    "null": "null",
    "a-list": '["farm/a"]',
    "a-string": '"draining"',
    "no-servers": '{"version": 1}',
    "truncated": '{"version": 1, "servers": {"farm/a": "drain',
    "not-utf-8": b'{"servers": {"farm/a": "\xff"}}',
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
async def test_a_damaged_state_file_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes
) -> None:
    state = tmp_path / "state.json"
    if isinstance(content, bytes):
        state.write_bytes(content)
    else:
        state.write_text(content)
    caplog.set_level(logging.ERROR, logger="lbproxy")
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(FARM, tmp_path, token=TOKEN, state=state, health=NO_HEALTH, a=a.address, b=b.address) as lb,
    ):
        assert {server.admin for server in lb.pools["farm"].servers} == {AdminState.ENABLED}
        assert sorted([(await get(port_of(lb))).body for _ in range(4)]) == [b"a", b"a", b"b", b"b"]
        assert any("cannot read the state file" in record.getMessage() for record in caplog.records)
        lb.drain(lb.server("farm", "a"))
        await lb.refresh()
        assert json.loads(state.read_text()) == {"version": 1, "servers": {"farm/a": "draining"}}


async def test_the_state_file_is_written_off_the_event_loop_and_the_last_state_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk (fsync held until the test lets it go) must not stop the proxy: the write runs in a
    # thread, and the states saved meanwhile fold into the last one, written after it.
    disk = threading.Event()
    entered = threading.Event()
    calls: list[tuple[threading.Thread, bool]] = []  # (thread, whether the disk was let go in time)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        calls.append((threading.current_thread(), disk.wait(timeout=3)))
        real_fsync(fd)

    state = tmp_path / "state.json"
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(FARM, tmp_path, token=TOKEN, state=state, health=NO_HEALTH, a=a.address, b=b.address) as lb,
    ):
        monkeypatch.setattr(os, "fsync", slow_fsync)
        try:
            lb.drain(lb.server("farm", "a"))
            await eventually(entered.is_set, what="the first write to reach fsync")
            assert (await get(port_of(lb))).body == b"b"  # served while the disk is held
            lb.enable(lb.server("farm", "a"))
            lb.disable(lb.server("farm", "b"))
            lb.drain(lb.server("farm", "b"))
        finally:
            disk.set()
        await lb.refresh()
        assert json.loads(state.read_text()) == {"version": 1, "servers": {"farm/b": "draining"}}
        assert calls
        assert all(in_time for _, in_time in calls), "fsync held the event loop"
        assert threading.main_thread() not in {thread for thread, _ in calls}
        assert [name for name in os.listdir(tmp_path) if name.startswith(".state")] == []  # no temporary left


# -- the process: signals -----------------------------------------------------------------------------

BOUND = re.compile(r"^(\S+): .* (?:https?|tcp)://([^\s/]+):(\d+)/$")


@dataclass
class Process:
    """`lbproxy run` as a subprocess: its ports by listener name, and its log."""

    process: asyncio.subprocess.Process
    ports: dict[str, int]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def admin(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['admin']}"


@contextlib.asynccontextmanager
async def lbproxy_process(directory: Path, yaml_text: str, **substitutions: object) -> AsyncIterator[Process]:
    write_config(directory, yaml_text, **substitutions)
    out, log = directory / "stdout.txt", directory / "stderr.txt"
    with out.open("wb") as stdout, log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lbproxy",
            "run",
            "-c",
            str(directory / "lbproxy.yaml"),
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=directory,
        )
    try:

        def started() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"lbproxy exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            return "SIGHUP reloads" in out.read_text()

        await eventually(started, timeout=20.0, what="lbproxy to start")
        ports = {}
        for line in out.read_text().splitlines():
            match = BOUND.match(line)
            if match:
                ports[match.group(1)] = int(match.group(3))
        yield Process(process, ports, log)
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), timeout=10)


SIGNALLED = """
shutdown_timeout: 10s
admin:
  bind: 127.0.0.1:0
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_lets_the_request_in_flight_finish_then_exits_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    release = asyncio.Event()

    async def respond(request: Request, transport: asyncio.Transport) -> None:
        if request.target == b"/slow":
            await release.wait()  # answers once the test has seen the shutdown begin: about a second
        body = request.target
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async with Backend("a", respond=respond) as a, lbproxy_process(tmp_path, SIGNALLED, a=a.address) as lb:
        port = lb.ports["web"]
        idle = await Client.connect(port)
        busy = await Client.connect(port)
        try:
            await idle.send(b"GET /fast HTTP/1.1\r\nHost: test\r\n\r\n")
            assert (await idle.response()).status == 200  # now an idle keep-alive connection
            await busy.send(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            await eventually(lambda: len(a.requests) == 2, what="the slow request at its server")

            lb.process.send_signal(signum)
            await eventually(lambda: "shutting down" in lb.log_text(), what="the shutdown to begin")
            await wait_until(lambda: refused(port), timeout=2.0, what="new connections to be refused")
            assert await refused(port)
            assert await idle.closed(timeout=3.0) == b""  # idle keep-alive connections are closed
            assert lb.process.returncode is None  # still waiting for the request in flight

            release.set()
            response = await busy.response(timeout=5.0)
            assert (response.status, response.body) == (200, b"/slow")
            assert response.header(b"Connection") == b"close"
            answered = time.monotonic()
            assert await busy.closed(timeout=3.0) == b""
            await eventually(lambda: lb.process.returncode is not None, timeout=5.0, what="lbproxy to exit")
            assert time.monotonic() - answered < 5.0
            assert lb.process.returncode == 0, lb.log_text()
        finally:
            await idle.close()
            await busy.close()
        log = lb.log_text()
        assert "stopped" in log
        assert "still open after" not in log


SIGNALLED_TWO = (
    SIGNALLED
    + """      - {{name: b, address: "{b}"}}
"""
)


async def test_sighup_reloads_the_config_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        lbproxy_process(tmp_path, SIGNALLED, a=a.address) as lb,
        aiohttp.ClientSession() as session,
    ):

        async def servers() -> list[str]:
            async with session.get(f"{lb.admin}/api/v1/pools/farm") as response:
                return [server["name"] for server in (await response.json())["servers"]]

        assert await servers() == ["a"]
        write_config(tmp_path, SIGNALLED_TWO, a=a.address, b=b.address)
        lb.process.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return await servers() == ["a", "b"]

        await wait_until(reloaded, what="the reload to add server b")
        assert await reload_counts(session, lb.admin) == {"success": 1.0, "failure": 0.0, "last_ok": 1.0}
        assert {(await get(lb.ports["web"])).body for _ in range(4)} == {b"a", b"b"}

        write_config(
            tmp_path, SIGNALLED_TWO.replace("servers:", "servers:\n      - nonsense"), a=a.address, b=b.address
        )
        lb.process.send_signal(signal.SIGHUP)

        async def refused_once() -> bool:
            return (await reload_counts(session, lb.admin)).get("failure") == 1.0

        await wait_until(refused_once, what="the invalid reload to be counted")
        assert "reload refused, the running config stays" in lb.log_text()
        assert (await reload_counts(session, lb.admin))["last_ok"] == 0.0
        assert await servers() == ["a", "b"]
        assert (await get(lb.ports["web"])).status == 200

        # `lbproxy ctl reload` says what is wrong and exits 1; on a valid file it exits 0.
        code, out, err = await ctl("--admin", lb.admin, "reload")
        assert code == 1, (out, err)
        assert "POST /api/v1/reload: 400 the config was refused; the running one stays" in err
        assert "pools.farm.servers[0]" in err
        write_config(tmp_path, SIGNALLED, a=a.address)
        code, out, err = await ctl("--admin", lb.admin, "reload")
        assert (code, out.strip()) == (0, "reloaded"), err
        assert await servers() == ["a"]
        assert await reload_counts(session, lb.admin) == {"success": 2.0, "failure": 2.0, "last_ok": 1.0}

        lb.process.send_signal(signal.SIGTERM)
        await eventually(lambda: lb.process.returncode is not None, timeout=10.0, what="lbproxy to exit")
        assert lb.process.returncode == 0


async def test_a_sighup_during_the_graceful_shutdown_does_not_cut_it_short(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with (
        Backend("a", respond=answers_when(release)) as a,
        lbproxy_process(tmp_path, SIGNALLED, a=a.address) as lb,
    ):
        async with await Client.connect(lb.ports["web"]) as busy:
            await busy.send(GET)
            await eventually(lambda: len(a.requests) == 1, what="the slow request at its server")
            lb.process.send_signal(signal.SIGTERM)
            await eventually(lambda: "shutting down" in lb.log_text(), what="the shutdown to begin")
            lb.process.send_signal(signal.SIGHUP)  # a config push that crosses the stop: ignored
            with contextlib.suppress(AssertionError):
                await eventually(lambda: lb.process.returncode is not None, timeout=1.0)
            assert lb.process.returncode is None, f"lbproxy died of SIGHUP ({lb.process.returncode})"
            release.set()
            assert (await busy.response()).status == 200
        await eventually(lambda: lb.process.returncode is not None, timeout=5.0, what="lbproxy to exit")
        assert lb.process.returncode == 0
