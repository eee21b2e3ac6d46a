"""How long a /metrics scrape stalls lbproxy's event loop (issue #14): not a test, no assertion.

lbproxy on 127.0.0.1 with SERVERS servers (no probes, no traffic: their addresses are only labels),
scraped SCRAPES times; a ticker on the loop (1 ms sleeps) records the longest gap it saw during each
scrape. With IDLE=1, the control: the same ticker and a 60 ms wait instead of a scrape, to see what
the machine's own load costs.

Usage, from the repository: .venv/bin/python metrics_stall.py [SERVERS=400] [SCRAPES=20] [IDLE=0]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from lbproxy import config
from lbproxy.runtime import Runtime


def yaml_text(servers: int) -> str:
    lines = [
        "admin:",
        "  bind: 127.0.0.1:0",
        "listeners:",
        "  - {name: web, bind: '127.0.0.1:0', pool: farm}",
        "pools:",
        "  farm:",
        "    servers:",
    ]
    lines += [f"      - {{name: s{i}, address: '127.0.0.1:{20000 + i}'}}" for i in range(servers)]
    return "\n".join(lines) + "\n"


class Ticker:
    """The longest gap between two wake-ups of a 1 ms sleep on the loop, while it runs."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.running = True

    async def run(self) -> None:
        last = time.perf_counter()
        while self.running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now


async def main(servers: int, scrapes: int, idle: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "lbproxy.yaml"
        path.write_text(yaml_text(servers))
        runtime = Runtime(config.load(path, environ={}))
        await runtime.start()
        try:
            for pool in runtime.pools.values():  # figures of realistic width to format
                for n, server in enumerate(pool.servers):
                    server.requests = 1_000_000 + n
                    server.sent_bytes = 800_000_000 + n
                    server.received_bytes = 12_000_000_000 + n
            bound = runtime.bound["admin"]
            url = f"http://{bound.host}:{bound.port}/metrics"
            async with aiohttp.ClientSession() as session:
                async with session.get(url) as response:  # warm up: imports, caches
                    size = len(await response.read())
                stalls, walls = [], []
                for _ in range(scrapes):
                    ticker = Ticker()
                    task = asyncio.ensure_future(ticker.run())
                    await asyncio.sleep(0.01)
                    started = time.perf_counter()
                    if idle:
                        await asyncio.sleep(0.06)
                    else:
                        async with session.get(url) as response:
                            await response.read()
                    walls.append(time.perf_counter() - started)
                    ticker.running = False
                    await task
                    stalls.append(ticker.longest)
        finally:
            await runtime.stop()
    ms = 1000
    print(f"{servers} servers, {size} bytes per scrape, {scrapes} {'idle waits (control)' if idle else 'scrapes'}")
    print(f"wall time: median {statistics.median(walls) * ms:.1f} ms, max {max(walls) * ms:.1f} ms")
    print(f"longest loop stall: median {statistics.median(stalls) * ms:.1f} ms, max {max(stalls) * ms:.1f} ms")


if __name__ == "__main__":
    given = [int(arg) for arg in sys.argv[1:]]
    servers, scrapes, idle = given + [400, 20, 0][len(given) :]
    uvloop.run(main(servers, scrapes, idle))
