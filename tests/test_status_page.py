"""The status page at `/` in a real browser: Debian's headless Chromium driven through Selenium.

lbproxy runs in this test's loop; every blocking Selenium call goes through `asyncio.to_thread` so that
the loop keeps serving the page's API calls meanwhile. The screenshots are test artefacts under
`tmp_path`; with LBPROXY_SCREENSHOT=1 the laptop-sized one is also copied to docs/status-page.png
(the README's picture), after waiting for the sparklines to fill a little.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver

import lbproxy
from lbproxy import admin, build
from lbproxy.runtime import Runtime
from tests.support import Backend, Client, Request, chromium, ctl, port_of, running

README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"
LAPTOP = (1280, 800)
PHONE = (390, 844)

CONFIG = """
admin:
  bind: 127.0.0.1:0
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: web
  - name: api
    bind: 127.0.0.1:0
    pool: api
pools:
  web:
    health: {{type: http, path: /health, interval: 150ms, timeout: 500ms, fall: 2, rise: 2}}
    servers:
      - {{name: web1, address: "{web1}"}}
      - {{name: web2, address: "{web2}"}}
      - {{name: web3, address: "{web3}"}}
      - {{name: web4, address: "{web4}"}}
  api:
    policy: least_connections
    health: {{type: tcp, interval: 1s}}
    servers:
      - {{name: api1, address: "{api1}"}}
      - {{name: api2, address: "{api2}", backup: true}}
"""

# What the page shows, read in one go so that a re-render between two reads cannot mix states.
ROWS = """
return Array.from(document.querySelectorAll('tr[data-server]'), (row) => ({
  pool: row.dataset.pool, server: row.dataset.server, state: row.dataset.state,
  backup: row.dataset.backup,
  rps: row.querySelector('[data-field=rps] b').textContent,
  eps: row.querySelector('[data-field=eps] b').textContent,
  since: row.querySelector('[data-field=since]').dataset.since,
  sinceText: row.querySelector('[data-field=since]').textContent,
  points: (row.querySelector('[data-field=rps] polyline')?.getAttribute('points') || '').split(' ').length,
}));
"""
LISTENERS = "return Array.from(document.querySelectorAll('tr[data-listener]'), (row) => row.dataset.listener);"
BANNER = """
const banner = document.getElementById('error');
return {shown: !banner.hidden, text: banner.textContent, updated: document.getElementById('updated').textContent,
        build: document.getElementById('build').textContent};
"""
OVERFLOW = "return document.documentElement.scrollWidth - window.innerWidth;"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with chromium(tmp_path, f"--window-size={LAPTOP[0]},{LAPTOP[1]}") as driver:
        yield driver


async def run(call: Callable[..., Any], *args: Any) -> Any:
    """A blocking Selenium call, off the loop."""
    return await asyncio.to_thread(call, *args)


async def until(driver: WebDriver, script: str, check: Callable[[Any], bool], what: str, timeout: float = 10.0) -> Any:
    """Run `script` in the page until `check` holds for what it returns; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        seen = await run(driver.execute_script, script)
        if check(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; the page shows {seen!r}")
        await asyncio.sleep(0.1)


def device(size: tuple[int, int], mobile: bool) -> dict[str, object]:
    """Chromium's device emulation: exactly this viewport, whatever the window around it."""
    return {"width": size[0], "height": size[1], "deviceScaleFactor": 2 if mobile else 1, "mobile": mobile}


def states(rows: list[dict[str, str]]) -> dict[str, str]:
    return {f"{row['pool']}/{row['server']}": row["state"] for row in rows}


def positive(shown: str) -> bool:
    """Whether a rate as the page shows it ("12.0", "0.5"; a dash before two polls) is above 0."""
    try:
        return float(shown) > 0
    except ValueError:
        return False


RATE = re.compile(r"\d+\.\d")  # one decimal, as `lbproxy ctl status` prints rates


def sometimes_500(every: int) -> Callable[[Request, asyncio.Transport], None]:
    """200 with a small body, but 500 for every `every`-th request: an error rate for the page to show."""
    count = 0

    def respond(request: Request, transport: asyncio.Transport) -> None:
        nonlocal count
        count += 1
        if request.target != b"/health" and count % every == 0:
            transport.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        else:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return respond


async def traffic(lb: Runtime) -> None:
    """Keep-alive clients on both listeners sending a request each in turn, at a rate that swells and
    ebbs over a few seconds, so that the page has connections, rates and sparklines to draw."""
    clients = [await Client.connect(port_of(lb, name)) for name in ("web", "web", "web", "api", "api")]
    try:
        while True:
            for client in clients:
                await client.send(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            for client in clients:
                await client.response()
            await asyncio.sleep(0.05 + 0.035 * math.sin(time.monotonic() / 5))  # pacing, not waiting
    finally:
        for client in clients:
            await client.close()


@contextlib.asynccontextmanager
async def background(lb: Runtime) -> AsyncIterator[None]:
    task = asyncio.create_task(traffic(lb))
    try:
        yield
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


async def since_agrees_with_the_api_and_ctl(
    session: aiohttp.ClientSession, base: str, rows: dict[str, dict[str, Any]]
) -> None:
    """ "Since" on the page is the API's last_change (health or admin, the later), as in `ctl status`.

    web3 went down (a health change), web4 was drained and web1 drained then enabled (admin changes);
    the others never changed.
    """
    async with session.get(f"{base}/api/v1/pools") as response:
        servers = {server["name"]: server for pool in (await response.json())["pools"] for server in pool["servers"]}
    assert servers["web3"]["last_change"]["kind"] == "health"
    assert servers["web4"]["last_change"]["kind"] == "admin"
    assert servers["web1"]["last_change"]["kind"] == "admin"
    for name, row in rows.items():
        change = servers[name]["last_change"]
        if change["time"] is None:
            assert (row["since"], row["sinceText"]) == ("", "since start")
        else:
            assert float(row["since"]) == change["time"]
            assert re.fullmatch(r"\d+s ago" + re.escape(change["reason"]), row["sinceText"]), row
    assert rows["web3"]["sinceText"].endswith("ago" + "connection refused")
    assert rows["web4"]["sinceText"].endswith("ago" + "draining")
    assert rows["web1"]["sinceText"].endswith("ago" + "enabled")
    assert rows["web2"]["sinceText"] == "since start"
    code, out, _ = await ctl("--admin", base, "status")
    assert code == 0
    header, *lines = (re.split(r"\s{2,}", line) for line in out.splitlines())
    shown = {cells[1]: dict(zip(header, cells, strict=False)) for cells in lines}
    for name, row in rows.items():
        assert (shown[name]["SINCE"] == "-") is (row["since"] == ""), (name, shown[name], row)
        assert RATE.fullmatch(shown[name]["REQ/S"])
        assert RATE.fullmatch(shown[name]["ERR/S"])


async def test_status_page_shows_the_farm_and_a_server_going_down(tmp_path: Path, browser: WebDriver) -> None:
    readme = os.environ.get("LBPROXY_SCREENSHOT") == "1"
    names = ("web1", "web2", "web3", "web4", "api1", "api2")
    backends = {name: Backend(name, respond=sometimes_500(7) if name == "web2" else None) for name in names}
    for backend in backends.values():
        await backend.start()
    try:
        addresses = {name: backend.address for name, backend in backends.items()}
        async with running(CONFIG, tmp_path, **addresses) as lb:
            base = f"http://{lb.bound['admin'].host}:{lb.bound['admin'].port}"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/") as response:
                    assert response.status == 200
                    assert response.content_type == "text/html"
                    assert response.headers["Content-Security-Policy"] == admin.STATUS_PAGE_POLICY
                async with background(lb):
                    await run(browser.get, f"{base}/")
                    rows = await until(browser, ROWS, lambda rows: len(rows) == 6, "six server rows")
                    assert [(row["pool"], row["server"]) for row in rows] == [
                        ("web", "web1"),
                        ("web", "web2"),
                        ("web", "web3"),
                        ("web", "web4"),
                        ("api", "api1"),
                        ("api", "api2"),
                    ]
                    assert [row["backup"] for row in rows] == ["false"] * 5 + ["true"]
                    assert set(states(rows).values()) == {"up"}
                    assert await run(browser.execute_script, LISTENERS) == ["web", "api"]
                    meta = await run(browser.execute_script, BANNER)
                    assert not meta["shown"]
                    assert meta["updated"].startswith("Updated ")
                    assert meta["build"] == f"{lbproxy.__version__} · {build.described()}"  # which build answers
                    if readme:  # some history before the incident, for the picture
                        await until(browser, ROWS, lambda rows: rows[0]["points"] >= 15, "history", timeout=60)

                    # web4 drained; web1 drained and enabled again: its latest change is "enabled", which
                    # "since" shows though its admin state is back to normal.
                    for server, action in (("web4", "drain"), ("web1", "drain"), ("web1", "enable")):
                        url = f"{base}/api/v1/pools/web/servers/{server}/{action}"
                        async with session.post(url, headers={"X-Lbproxy-Admin": "1"}) as response:
                            assert response.status == 200
                    await backends["web3"].stop()  # the back-end dies; its probes fail twice: down
                    expected = {
                        "web/web1": "up",
                        "web/web2": "up",
                        "web/web3": "down",
                        "web/web4": "draining",
                        "api/api1": "up",
                        "api/api2": "up",
                    }
                    await until(browser, ROWS, lambda rows: states(rows) == expected, "web3 down, web4 draining")

                    # Rates come from counter deltas between two polls, in the browser.
                    def rates_shown(rows: list[dict[str, Any]]) -> bool:
                        by_name = {row["server"]: row for row in rows}
                        return (
                            positive(by_name["web1"]["rps"])
                            and positive(by_name["web2"]["eps"])
                            and by_name["web1"]["eps"] == "0.0"
                            and by_name["api2"]["rps"] == "0.0"  # a backup, idle while api1 serves
                            and by_name["web1"]["points"] >= (30 if readme else 2)
                        )

                    rows = await until(
                        browser, ROWS, rates_shown, "request and error rates", timeout=60 if readme else 10
                    )
                    assert all(RATE.fullmatch(row[field]) for row in rows for field in ("rps", "eps")), rows
                    await since_agrees_with_the_api_and_ctl(session, base, {row["server"]: row for row in rows})
                    logs = await run(browser.get_log, "browser")
                    assert [entry for entry in logs if entry["level"] == "SEVERE"] == []

                    laptop = tmp_path / "status-page-laptop.png"
                    await run(browser.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", device(LAPTOP, False))
                    assert await run(browser.save_screenshot, str(laptop))
                    if readme:
                        README_SCREENSHOT.parent.mkdir(exist_ok=True)
                        shutil.copyfile(laptop, README_SCREENSHOT)

                    # A phone: the rows become cards, and nothing is wider than the screen.
                    await run(browser.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", device(PHONE, True))
                    assert await run(browser.execute_script, OVERFLOW) <= 0
                    assert await run(browser.save_screenshot, str(tmp_path / "status-page-phone.png"))
                    await run(browser.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})
        # lbproxy is gone: the page says so, and keeps what it last saw.
        meta = await until(browser, BANNER, lambda meta: meta["shown"], "the error banner")
        assert "Cannot reach the lbproxy admin API" in meta["text"]
        assert meta["updated"].startswith("Last updated ")
        assert len(await run(browser.execute_script, ROWS)) == 6
        assert await run(browser.save_screenshot, str(tmp_path / "status-page-unreachable.png"))
    finally:
        for backend in backends.values():
            await backend.stop()
