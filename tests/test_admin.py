"""The admin API and `lbproxy ctl` against a running lbproxy: state, auth rules, drain and enable."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from lbproxy import admin
from lbproxy.ctl import ago, status_table
from lbproxy.pool import AdminState
from tests.support import LOCALHOST, Backend, admin_farm, ctl, eventually, get, port_of, running

CONFIG = admin_farm(admin="{token}\n")


def admin_url(runtime: object) -> str:
    bound = runtime.bound["admin"]  # type: ignore[attr-defined]
    return f"http://{bound.host}:{bound.port}"


async def test_pools_and_readiness(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="") as lb,
    ):
        base = admin_url(lb)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 200  # no health checks: ready once bound
            await get(port_of(lb))
            async with session.get(f"{base}/api/v1/pools") as response:
                body = await response.json()
            (farm,) = body["pools"]
            assert farm["name"] == "farm"
            assert farm["policy"] == "round_robin"
            assert [s["name"] for s in farm["servers"]] == ["a", "b"]
            assert sum(s["counters"]["requests"] for s in farm["servers"]) == 1
            assert {s["state"] for s in farm["servers"]} == {"up"}
            async with session.get(f"{base}/api/v1/pools/farm") as response:
                assert (await response.json())["servers_up"] == 2
            async with session.get(f"{base}/api/v1/pools/nope") as response:
                assert response.status == 404
                assert "nope" in (await response.json())["error"]


async def test_drain_through_the_api_sends_nothing_new(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="") as lb,
    ):
        base = admin_url(lb)
        async with aiohttp.ClientSession(headers={HEADER: "1"}) as session:
            async with session.post(f"{base}/api/v1/pools/farm/servers/a/drain") as response:
                assert response.status == 200
                state = await response.json()
            assert state["admin"] == "draining"
            assert lb.pools["farm"].by_name["a"].admin is AdminState.DRAINING
            for _ in range(6):
                assert (await get(port_of(lb))).body == b"b"
            assert not a.requests
            async with session.post(f"{base}/api/v1/pools/farm/servers/a/enable") as response:
                assert (await response.json())["admin"] == "enabled"
            bodies = {(await get(port_of(lb))).body for _ in range(4)}
            assert bodies == {b"a", b"b"}
            async with session.post(f"{base}/api/v1/pools/farm/servers/a/explode") as response:
                assert response.status == 400
            async with session.post(f"{base}/api/v1/pools/farm/servers/zz/drain") as response:
                assert response.status == 404


@pytest.mark.parametrize(
    ("header", "status"),
    [(None, 401), ("Bearer wrong", 401), ("Basic s3cret", 401), ("Bearer s3cret", 200)],
)
async def test_writes_need_the_token_when_one_is_set(tmp_path: Path, header: str | None, status: int) -> None:
    token = "  token: s3cret"
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token=token) as lb,
    ):
        headers = {"Authorization": header} if header else {}
        async with aiohttp.ClientSession() as session:
            url = f"{admin_url(lb)}/api/v1/pools/farm/servers/a/drain"
            async with session.post(url, headers=headers) as response:
                assert response.status == status
                body = await response.json()
            async with session.get(f"{admin_url(lb)}/api/v1/pools") as response:
                assert response.status == 200  # reads need no token
        expected = AdminState.DRAINING if status == 200 else AdminState.ENABLED
        assert lb.pools["farm"].by_name["a"].admin is expected
        if status != 200:
            assert "token" in body["error"]


async def test_writes_without_a_token_are_refused_off_loopback(tmp_path: Path) -> None:
    # The app as it is built for a non-loopback admin.bind, served here on 127.0.0.1.
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="") as lb,
    ):
        runner = web.AppRunner(admin.make_app(lb, lb.registry, token=None, loopback=False))
        await runner.setup()
        site = web.TCPSite(runner, LOCALHOST, 0)
        await site.start()
        try:
            host, port = runner.addresses[0][:2]
            url = f"http://{host}:{port}/api/v1/pools/farm/servers/a/drain"
            async with aiohttp.ClientSession() as session, session.post(url) as response:
                assert response.status == 403
                assert "admin.token" in (await response.json())["error"]
        finally:
            await runner.cleanup()
        assert lb.pools["farm"].by_name["a"].admin is AdminState.ENABLED


async def refused_writes(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """lbproxy_admin_refused_writes_total by reason, from /metrics."""
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "lbproxy_admin_refused_writes_total"
    }


HEADER = "X-Lbproxy-Admin"  # what writes without a token carry (lbproxy ctl does): part of the API

# What a web page in a browser on the admin's host can make it send (issue #14, defect 12). The Host
# and Origin are header values only: every request goes to the admin server on 127.0.0.1.
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PAGE_WRITES = {
    "form POST from another site": (
        {**FORM, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        "cross_origin",
    ),
    "form POST from another site, an older browser": ({**FORM, "Origin": "http://evil.example"}, "cross_origin"),
    "form POST from a page on another local port": ({**FORM, "Origin": "http://127.0.0.1:8000"}, "cross_origin"),
    "form POST from a sandboxed page": ({**FORM, "Origin": "null"}, "cross_origin"),
    "form POST from a browser that sends no Origin": (FORM, "header"),
    "DNS rebinding: the page's own name, now 127.0.0.1": (
        {
            "Host": "evil.example:9090",
            "Origin": "http://evil.example:9090",
            "Sec-Fetch-Site": "same-origin",
            HEADER: "1",
            "Content-Type": "application/json",
        },
        "host",
    ),
    "DNS rebinding, no Origin": ({"Host": "evil.example:9090", HEADER: "1"}, "host"),
}


async def test_a_web_page_cannot_write_to_a_loopback_admin_without_a_token(tmp_path: Path) -> None:
    """Issue #14, defect 12: writes need what no page of another origin can send, and a loopback Host."""
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="") as lb,
        aiohttp.ClientSession() as session,
    ):
        base = admin_url(lb)
        server = lb.pools["farm"].by_name["a"]
        for what, (headers, _) in PAGE_WRITES.items():
            for path in ("/api/v1/pools/farm/servers/a/disable", "/api/v1/reload"):
                async with session.post(f"{base}{path}", data=b"x=1", headers=headers) as response:
                    assert response.status == 403, (what, path)
                    error = (await response.json())["error"]
                    assert error, what
        assert server.admin is AdminState.ENABLED  # nothing changed
        assert server.admin_time == 0
        assert lb.reloads.get("success", 0) == lb.reloads.get("failure", 0) == 0
        assert sorted({(await get(port_of(lb))).body for _ in range(4)}) == [b"a", b"b"]
        expected = dict.fromkeys(("cross_origin", "host", "header", "token", "off_loopback"), 0.0)
        for _, reason in PAGE_WRITES.values():
            expected[reason] += 2
        assert await refused_writes(session, base) == expected

        # The same origin (the admin's own address, or localhost through an ssh -L on another port)
        # and tools that are no browser (no Origin) may write, with the header.
        port = lb.bound["admin"].port
        same_origin = {"Origin": base, "Sec-Fetch-Site": "same-origin", HEADER: "1"}
        url = f"{base}/api/v1/pools/farm/servers/a/drain"
        async with session.post(url, headers=same_origin) as response:
            assert response.status == 200
            assert (await response.json())["admin"] == "draining"
        assert server.admin is AdminState.DRAINING
        tunnel = {"Host": "localhost:19090", "Origin": "http://localhost:19090", HEADER: "1"}
        async with session.post(f"{base}/api/v1/pools/farm/servers/a/enable", headers=tunnel) as response:
            assert response.status == 200
        assert server.admin is AdminState.ENABLED
        async with session.post(url, headers={"Host": f"[::1]:{port}", HEADER: "yes"}) as response:
            assert response.status == 200
        assert server.admin is AdminState.DRAINING
        code, out, _ = await ctl("--admin", base, "enable", "farm", "a")
        assert (code, out.strip()) == (0, "farm/a: enabled, up, 0 in flight")
        assert await refused_writes(session, base) == expected  # none of these was refused


async def test_with_a_token_a_page_of_another_origin_is_refused_too(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="  token: s3cret") as lb,
        aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as session,
    ):
        base = admin_url(lb)
        url = f"{base}/api/v1/pools/farm/servers/a/drain"
        async with session.post(url, headers={**FORM, "Origin": "http://evil.example"}) as response:
            assert response.status == 403
            assert "cross-origin" in (await response.json())["error"]
        assert lb.pools["farm"].by_name["a"].admin is AdminState.ENABLED
        # The token is the proof: the Host may be any name of the admin server (DNS, floating IP, a proxy).
        async with session.post(url, headers={"Host": "lb1.example.net:9090"}) as response:
            assert response.status == 200
        assert lb.pools["farm"].by_name["a"].admin is AdminState.DRAINING
        async with aiohttp.ClientSession() as anonymous, anonymous.post(url) as response:
            assert response.status == 401
        assert (await refused_writes(session, base))["cross_origin"] == 1
        assert (await refused_writes(session, base))["token"] == 1


@pytest.mark.parametrize(
    ("headers", "token", "loopback", "refused"),
    [
        ({"Host": "127.0.0.1:9090", HEADER: "1"}, None, True, None),
        ({"Host": "127.0.0.2:1", HEADER: "1"}, None, True, None),
        ({"Host": "[::1]:9090", HEADER: "1"}, None, True, None),
        ({"Host": "LOCALHOST", HEADER: "1"}, None, True, None),
        ({"Host": "localhost:9090", HEADER: "1", "Sec-Fetch-Site": "none"}, None, True, None),
        ({"Host": "127.0.0.1:9090"}, None, True, "header"),
        ({"Host": "127.0.0.1:9090", HEADER: ""}, None, True, "header"),
        ({HEADER: "1"}, None, True, "host"),
        ({"Host": "localhost.evil.example", HEADER: "1"}, None, True, "host"),
        ({"Host": "127.0.0.1.nip.io:9090", HEADER: "1"}, None, True, "host"),
        ({"Host": "[::1", HEADER: "1"}, None, True, "host"),
        (
            {"Host": "127.0.0.1:9090", HEADER: "1", "Sec-Fetch-Site": "same-site"},
            None,
            True,
            "cross_origin",
        ),
        ({"Host": "127.0.0.1:9090", HEADER: "1", "Origin": "http://127.0.0.1"}, None, True, "cross_origin"),
        ({"Host": "127.0.0.1:9090", HEADER: "1"}, None, False, "off_loopback"),
        ({"Host": "lb1.example:9090", "Authorization": "Bearer t"}, "t", False, None),
        (
            {"Host": "lb1.example:9090", "Authorization": "Bearer t", "Origin": "http://lb1.example:9090"},
            "t",
            False,
            None,
        ),
        ({"Host": "127.0.0.1:9090", HEADER: "1"}, "t", True, "token"),
        (
            {"Host": "lb1.example:9090", "Authorization": "Bearer t", "Origin": "https://x.example"},
            "t",
            False,
            "cross_origin",
        ),
    ],
)
def test_write_refusal_rules(headers: dict[str, str], token: str | None, loopback: bool, refused: str | None) -> None:
    assert admin.ADMIN_HEADER == HEADER
    refusal = admin.write_refusal(CIMultiDict(headers), token, loopback)
    assert (refusal.reason if refusal else None) == refused
    if refusal is not None:
        assert refusal.status == (401 if refused == "token" else 403)


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1", "localhost", "10.1.2.3", "0.0.0.0"])
def test_loopback_detection(bind: str) -> None:
    assert admin.is_loopback(bind) is (bind in ("127.0.0.1", "::1", "localhost"))


async def test_ctl_status_drain_enable(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="") as lb,
    ):
        base = admin_url(lb)
        code, out, _ = await ctl("--admin", base, "status")
        assert code == 0
        assert out.splitlines()[0].split()[:4] == ["POOL", "SERVER", "STATE", "ADMIN"]
        assert [line.split()[:4] for line in out.splitlines()[1:]] == [
            ["farm", "a", "up", "enabled"],
            ["farm", "b", "up", "enabled"],
        ]
        code, out, _ = await ctl("--admin", base, "drain", "farm", "b")
        assert (code, out.strip()) == (0, "farm/b: draining, up, 0 in flight")
        assert lb.pools["farm"].by_name["b"].admin is AdminState.DRAINING
        code, _, err = await ctl("--admin", base, "enable", "farm", "nope")
        assert code == 1
        assert "no server named 'nope'" in err
        code, _, _ = await ctl("--admin", base, "enable", "farm", "b")
        assert code == 0
        assert lb.pools["farm"].by_name["b"].admin is AdminState.ENABLED


async def test_ctl_says_when_the_admin_server_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port = sock.getsockname()[1]
    code, _, err = await ctl("--admin", f"http://{LOCALHOST}:{port}", "status")
    assert code == 2
    assert "cannot reach the admin server" in err


async def test_openapi_document_lists_every_route(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="") as lb,
    ):
        url = f"{admin_url(lb)}/api/v1/openapi.json"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            document = await response.json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/healthz",
        "/readyz",
        "/api/v1/listeners",
        "/api/v1/pools",
        "/api/v1/cluster",
        "/api/v1/pools/{pool}",
        "/api/v1/pools/{pool}/servers",
        "/api/v1/pools/{pool}/servers/{server}",
        "/api/v1/pools/{pool}/servers/{server}/{action}",
        "/api/v1/pools/{pool}/servers/{server}/weight",
        "/api/v1/reload",
    }
    action = document["paths"]["/api/v1/pools/{pool}/servers/{server}/{action}"]["post"]
    assert set(action["responses"]) == {"200", "400", "401", "403", "404", "503"}


async def test_ctl_status_shows_rates(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="") as lb,
    ):
        code, out, _ = await ctl("--admin", admin_url(lb), "status")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[4:7] == ["INFLIGHT", "REQ/S", "ERR/S"]


PROBED = admin_farm(pool="    health: {{type: tcp, interval: 100ms, timeout: 500ms, rise: 1, fall: 1}}\n")


def table(out: str) -> list[dict[str, str]]:
    """`ctl status` output as rows of cells (columns are 2 spaces or more apart; a cell has 1 at most)."""
    header, *rows = (re.split(r"\s{2,}", line) for line in out.splitlines())
    return [dict(zip(header, row + [""] * (len(header) - len(row)), strict=True)) for row in rows]


async def test_since_is_the_latest_change_of_health_or_admin_state(tmp_path: Path) -> None:
    """The API's `last_change`, which the status page and `ctl status` show as "since"."""
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(PROBED, tmp_path, a=a.address, b=b.address) as lb,
        aiohttp.ClientSession() as session,
    ):
        base = admin_url(lb)

        async def servers() -> dict[str, Any]:
            async with session.get(f"{base}/api/v1/pools/farm") as response:
                return {server["name"]: server for server in (await response.json())["servers"]}

        await eventually(lambda: lb.pools["farm"].by_name["b"].check_ok is True, what="b probed")
        assert (await servers())["b"]["last_change"] == {"time": None, "kind": None, "reason": ""}
        code, out, _ = await ctl("--admin", base, "status")
        assert code == 0
        assert [row["SINCE"] for row in table(out)] == ["-", "-"]

        code, _, _ = await ctl("--admin", base, "drain", "farm", "b")
        assert code == 0
        b_state = (await servers())["b"]
        assert b_state["since"] is None
        assert b_state["last_change"] == {"time": b_state["admin_since"], "kind": "admin", "reason": "draining"}

        await b.stop()  # health changes after the admin state: that is the later change
        await eventually(lambda: not lb.pools["farm"].by_name["b"].up, what="b down")
        b_state = (await servers())["b"]
        assert b_state["since"] > b_state["admin_since"]
        assert b_state["last_change"] == {"time": b_state["since"], "kind": "health", "reason": "connection refused"}
        code, out, _ = await ctl("--admin", base, "status")
        assert code == 0
        rows = table(out)
        assert [(row["SERVER"], row["STATE"], row["ADMIN"]) for row in rows] == [
            ("a", "up", "enabled"),
            ("b", "down", "draining"),
        ]
        assert rows[0]["SINCE"] == "-"
        assert re.fullmatch(r"\d+s ago", rows[1]["SINCE"])
        assert all(re.fullmatch(r"\d+\.\d", row[column]) for row in rows for column in ("REQ/S", "ERR/S"))


def test_status_table_since_and_rates() -> None:
    now = time.time()

    def server(name: str, since: float | None, admin_since: float | None, **extra: Any) -> dict[str, Any]:
        counters = {
            "requests": 10,
            "responses": {"1xx": 0, "2xx": 10, "3xx": 0, "4xx": 0, "5xx": 0},
            "connect_failures": 0,
            "failures": 0,
        }
        return {
            "name": name,
            "state": "up",
            "backup": False,
            "admin": "enabled",
            "inflight": 0,
            "since": since,
            "admin_since": admin_since,
            "last_check": {"ok": None, "reason": "", "time": None, "duration": 0.0},
            "counters": counters,
            **extra,
        }

    pools: list[dict[str, Any]] = [
        {
            "name": "farm",
            "servers": [
                server("new", now - 400, now - 30, last_change={"time": now - 30, "kind": "admin", "reason": "x"}),
                server("old", now - 400, now - 185),  # an lbproxy before `last_change`: the later of the two
                server("older", now - 7300, None),
                server("quiet", None, None),
            ],
        }
    ]
    earlier = [
        {"name": "farm", "servers": [{**s, "counters": {**s["counters"], "requests": 7}} for s in pools[0]["servers"]]}
    ]
    rows = table(status_table(pools, earlier, seconds=2.0))
    assert [row["SINCE"] for row in rows] == ["30s ago", "3m 05s ago", "2h 01m ago", "-"]
    assert {row["REQ/S"] for row in rows} == {"1.5"}
    assert {row["ERR/S"] for row in rows} == {"0.0"}


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.4, "0s ago"),
        (59.9, "59s ago"),
        (60, "1m 00s ago"),
        (3599, "59m 59s ago"),
        (7260, "2h 01m ago"),
        (273600, "3d 4h ago"),
    ],
)
def test_ago_reads_as_the_status_page(seconds: float, shown: str) -> None:
    assert ago(seconds) == shown


async def test_log_format_json(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.yaml"
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port = sock.getsockname()[1]
    path.write_text(
        f"log_format: json\nlisteners:\n  - {{name: web, bind: '127.0.0.1:{port}', pool: farm}}\n"
        "pools:\n  farm:\n    servers:\n      - {name: a, address: '127.0.0.1:9'}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbproxy", "run", "-c", str(path), stderr=asyncio.subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        line = await asyncio.wait_for(process.stderr.readline(), timeout=20)
    finally:
        process.terminate()
        await process.wait()
    entry = json.loads(line)
    assert entry["level"] == "info"
    assert entry["logger"] == "lbproxy"
    assert entry["message"].startswith("listener web: http on 127.0.0.1:")
