"""Hedged requests (`pools.<name>.hedge`): when to send a request a second time, and whether it may.

A frozen server (alive to the kernel, silent to requests) costs its users the whole response
timeout until probes or passive detection take it out. A hedge is the answer: an idempotent
request without a body (GET, HEAD, OPTIONS) that has had no response byte after `after` is sent to
a second server too; the response that starts first is relayed, and the other connection is
closed. `after` is fixed, or `p99`: the pool's own recent 99th percentile time to first byte (of
the last `SAMPLES` responses), never below `floor`.

The extra load is bounded by `max_extra`: each request earns the pool that fraction of a hedge,
up to `BURST` hedges in hand, and each hedge spends one; a request that would hedge with none in
hand is counted (`budget`) and waits for its first server alone. A slow farm is not doubled.

A server that loses a hedge (its peer answered first; it had sent no byte) has a failure reported
for passive detection: a frozen server under load loses several in a row and leaves the rotation
in well under a second, without waiting for probes. One that answers resets the count, as any
success does.

`Hedging` is one pool's: plain code, no I/O. The proxies register each request they send in
`due` (the deadlines come in the order the requests went, `after` being one value per pool), and
`watch` drives them with one event-loop timer per pool at the earliest deadline, not one per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final, Protocol

HEDGEABLE: Final = frozenset({b"GET", b"HEAD", b"OPTIONS"})
SAMPLES: Final = 1000  # the responses `p99` is taken over
BURST: Final = 100.0  # the most hedges in hand: a frozen server strands a burst of requests at once
GRAIN: Final = 0.005  # the timer is not re-armed closer than this: deadlines a few ms apart are met together

WON: Final = "won"
LOST: Final = "lost"
BUDGET: Final = "budget"
UNAVAILABLE: Final = "unavailable"


class Hedging:
    """One pool's hedging: its delay, its budget, the requests that wait to be checked, its counts."""

    __slots__ = ("fixed", "floor", "max_extra", "tokens", "samples", "after", "due", "timer", "results")

    def __init__(self, after: float | None, floor: float, max_extra: float) -> None:
        self.fixed = after  # None: the pool's p99 time to first byte, with `floor`
        self.floor = floor
        self.max_extra = max_extra
        self.tokens = 1.0  # hedges in hand: one to begin with, then earned by requests
        self.samples: deque[float] = deque(maxlen=SAMPLES)  # times to first byte (p99 only)
        self.after = after if after is not None else floor
        self.due: deque[tuple[float, Hedger, Any]] = deque()  # (deadline, proxy, exchange), in order
        self.timer: asyncio.TimerHandle | None = None
        self.results = {WON: 0, LOST: 0, BUDGET: 0, UNAVAILABLE: 0}

    def sent(self) -> None:
        """A request that could be hedged went to its server: the budget grows by `max_extra`."""
        tokens = self.tokens + self.max_extra
        self.tokens = tokens if tokens < BURST else BURST

    def may_hedge(self) -> bool:
        """Whether a hedge may go now (it spends a token), else it is counted as refused."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.results[BUDGET] += 1
        return False

    def answered(self, seconds: float) -> None:
        """A response's first byte came `seconds` after its request went (p99 mode keeps them)."""
        if self.fixed is None:
            self.samples.append(seconds)

    def refresh(self) -> None:
        """Recompute `after` from the samples (p99 mode); the runtime calls it about once a second."""
        if self.fixed is not None or len(self.samples) < 100:
            return
        ordered = sorted(self.samples)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        self.after = p99 if p99 > self.floor else self.floor

    def numbers(self) -> dict[str, Any]:
        return {"results": dict(self.results), "after": self.after}

    def carry_on(self, previous: Hedging) -> None:
        """Keep the counts, the budget and the samples of the pool's hedging before a reload."""
        self.results = previous.results
        self.tokens = previous.tokens
        self.samples.extend(previous.samples)
        self.refresh()

    def stop(self) -> None:
        """The pool is gone (a reload): its pending checks are dropped."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.due.clear()


class Hedger(Protocol):
    """What a watch calls back: the client side of a request (`http_proxy.HttpProxy`)."""

    def hedge_due(self, exchange: Any) -> None: ...


def watch(loop: asyncio.AbstractEventLoop, hedging: Hedging, proxy: Hedger, exchange: Any) -> None:
    """Call `proxy.hedge_due(exchange)` once `hedging.after` has passed (it decides then whether a
    hedge still makes sense): one timer per pool, at the earliest deadline, not one per request."""
    deadline = loop.time() + hedging.after
    hedging.due.append((deadline, proxy, exchange))
    if hedging.timer is None:
        hedging.timer = loop.call_at(deadline, _fire, loop, hedging)


def _fire(loop: asyncio.AbstractEventLoop, hedging: Hedging) -> None:
    hedging.timer = None
    due = hedging.due
    now = loop.time()
    while due and due[0][0] <= now + GRAIN:
        _, proxy, exchange = due.popleft()
        proxy.hedge_due(exchange)
    if due:
        hedging.timer = loop.call_at(max(due[0][0], now + GRAIN), _fire, loop, hedging)
