"""Hedged requests and frozen servers (issue #17): a GET with no answer after `after` goes to a second
server too and the first answer wins; a server that keeps losing hedges leaves the rotation; the
budget bounds the extra load; a request with a body is never sent twice.

The frozen server is a real process, stopped with SIGSTOP (its kernel still accepts connections,
nothing answers them), as in benchmarks/failover.py.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from lbproxy import metrics
from lbproxy.hedging import BUDGET, LOST, WON
from lbproxy.runtime import Runtime
from tests.support import Backend, Client, free_port, get, port_of, running

# A back-end in a process of its own: every request gets 200 with its name, after `delay` seconds.
SERVER = r"""
import asyncio, sys
name, port, delay = sys.argv[1].encode(), int(sys.argv[2]), float(sys.argv[3])
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            if delay:
                await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(name), name))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=511)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


@asynccontextmanager
async def process_backend(name: str, delay: float = 0.0) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, name, str(port), str(delay), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 10)
        assert line == b"ready\n", line
        yield process, port
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        await asyncio.wait_for(process.wait(), 10)


def pool_text(addresses: dict[str, int], hedge: str, extra: str = "") -> str:
    servers = "".join(f'      - {{name: {name}, address: "127.0.0.1:{port}"}}\n' for name, port in addresses.items())
    text = (
        "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    pool: farm\n"
        f"pools:\n  farm:\n    hedge: {hedge}\n{extra}    servers:\n{servers}"
    )
    return text.replace("{", "{{").replace("}", "}}")


def hedges(lb: Runtime) -> dict[str, int]:
    hedging = lb.pools["farm"].hedging
    assert hedging is not None
    return hedging.results


async def timed_get(port: int, target: bytes = b"/") -> tuple[int, float, bytes]:
    started = time.monotonic()
    response = await get(port, target)
    return response.status, time.monotonic() - started, response.body


async def test_a_frozen_server_costs_a_hedge_delay_and_leaves_the_rotation(tmp_path: Path) -> None:
    async with process_backend("a") as (frozen, a), process_backend("b") as (_, b), process_backend("c") as (_, c):
        extra = (
            "    passive: {consecutive_failures: 3}\n"
            "    health: {type: http, path: /, interval: 10s, timeout: 1s, rise: 1, fall: 1}\n"
            "    timeouts: {response: 10s}\n"
        )
        text = pool_text({"a": a, "b": b, "c": c}, "{after: 200ms, max_extra: 50%}", extra)
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            assert [(await timed_get(port))[0] for _ in range(6)] == [200] * 6
            frozen.send_signal(signal.SIGSTOP)
            server = lb.pools["farm"].by_name["a"]
            results: list[tuple[int, float, bytes]] = []
            loop = asyncio.get_running_loop()
            started = loop.time()
            # steady load: 40 requests/s for 2 s, 4 at a time
            for _ in range(20):
                results += await asyncio.gather(*(timed_get(port) for _ in range(4)))
                await asyncio.sleep(0.1)
            assert [status for status, _, _ in results] == [200] * 80  # every GET answered
            slowest = max(seconds for _, seconds, _ in results)
            assert slowest < 0.2 + 0.4, slowest  # `after`, then a normal answer from another server
            assert b"a" not in {body for _, _, body in results}
            assert not server.up  # lost hedges took it out: passive detection, no probe involved
            assert server.transition_reason.startswith("passive: 3 consecutive failures (no answer in 200 ms")
            assert server.transition_time - time.time() < 1.0
            assert hedges(lb)[WON] >= 3
            assert loop.time() - started < 10
            families = {family.name: family for family in metrics.families(metrics.read(lb))}
            counted = {s.labels["result"]: s.value for s in families["lbproxy_pool_hedges"].samples}
            assert counted["won"] == hedges(lb)[WON]


async def test_the_budget_bounds_the_extra_requests(tmp_path: Path) -> None:
    async with process_backend("a", delay=0.3) as (_, a), process_backend("b", delay=0.3) as (_, b):
        text = pool_text({"a": a, "b": b}, "{after: 50ms, max_extra: 10%}")
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            for _ in range(10):  # every answer is slower than `after`: each request would hedge
                statuses = await asyncio.gather(*(get(port) for _ in range(10)))
                assert {response.status for response in statuses} == {200}
            counted = hedges(lb)
            sent = counted[WON] + counted[LOST]
            assert sent <= 1 + 0.1 * 100  # the first token, then a tenth of a hedge per request
            assert sent >= 5
            assert counted[BUDGET] >= 80


async def test_a_request_with_a_body_or_a_post_is_never_hedged(tmp_path: Path) -> None:
    witness = Backend("b")
    async with process_backend("a") as (frozen, a), witness:
        text = pool_text(
            {"a": a, "b": witness.port}, "{after: 100ms, max_extra: 100%}", "    timeouts: {response: 1s}\n"
        )
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            frozen.send_signal(signal.SIGSTOP)
            answers = []
            for method, body in ((b"POST", b"x=1"), (b"PUT", b"y"), (b"POST", b"")):
                async with await Client.connect(port) as client:
                    await client.send(
                        b"%s /submit HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (method, len(body), body)
                    )
                    answers.append((await client.response(timeout=5)).status)
            # round robin: some went to the frozen server and waited its response timeout (504);
            # none of them reached the other server a second time
            assert 504 in answers
            submitted = [request for request in witness.requests if request.target == b"/submit"]
            assert len(submitted) == answers.count(200)
            assert hedges(lb)[WON] + hedges(lb)[LOST] == 0


def test_p99_mode_follows_the_pool_and_keeps_its_floor() -> None:
    from lbproxy.hedging import Hedging

    hedging = Hedging(after=None, floor=0.05, max_extra=0.1)
    assert hedging.after == 0.05  # nothing seen yet: the floor
    for n in range(1000):
        hedging.answered(0.010 if n % 100 else 0.400)  # 1% of answers take 400 ms
    hedging.refresh()
    assert hedging.after == 0.4
    for _ in range(1000):
        hedging.answered(0.001)  # a fast farm: the p99 falls below the floor
    hedging.refresh()
    assert hedging.after == 0.05
    fixed = Hedging(after=0.2, floor=0.05, max_extra=0.1)
    fixed.answered(5.0)
    fixed.refresh()
    assert fixed.after == 0.2


async def test_when_the_first_server_times_out_its_hedge_carries_on(tmp_path: Path) -> None:
    async with process_backend("a") as (frozen, a), process_backend("b", delay=0.6) as (_, b):
        extra = "    timeouts: {response: 300ms}\n    policy: round_robin\n"
        text = pool_text({"a": a, "b": b}, "{after: 100ms, max_extra: 100%}", extra)
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            frozen.send_signal(signal.SIGSTOP)
            answers = [await timed_get(port) for _ in range(2)]  # one of them goes to a first
            # a said nothing in its 300 ms: the copy sent to b at 100 ms is the answer, not a 504
            assert [(status, body) for status, _, body in answers] == [(200, b"b"), (200, b"b")]
            assert hedges(lb)[WON] == 0  # b answered after a had failed: a promotion, not a race won
            servers = lb.pools["farm"].by_name
            # each request went to a, then its copy to b; no third copy (a retry) went anywhere
            assert servers["a"].requests + servers["b"].requests == 4
