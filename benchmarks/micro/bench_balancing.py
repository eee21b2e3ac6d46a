"""A policy pick as the proxies make it: `Pool.pick()`, then `taken()` and `released()`, for 4 and 400 servers.

Every pick is meant to be O(1) (O(log n) for least_connections' events): 400 servers should cost
about what 4 do. The weighted policies pay instead when a weight changes (a dynamic_ratio report, a
slow start's ramp): the next pick rebuilds their schedule, measured here for 4, 40 and 400 servers.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from conftest import make_pool

from lbproxy.config import POLICIES


@pytest.mark.benchmark(group="policy pick + taken + released")
@pytest.mark.parametrize("servers", [4, 400])
@pytest.mark.parametrize("policy", POLICIES)
def test_pick(benchmark: Any, policy: str, servers: int) -> None:
    pool = make_pool(policy, servers)
    pick, taken, released = pool.pick, pool.taken, pool.released

    def one_request() -> None:
        server = pick()
        assert server is not None
        taken(server)
        released(server)

    benchmark(one_request)
    assert sum(server.requests for server in pool.servers) > 0
    assert all(server.inflight == 0 for server in pool.servers)


@pytest.mark.benchmark(group="dynamic_ratio: a weight report, then the next pick")
@pytest.mark.parametrize("servers", [4, 40, 400])
def test_weight_report_then_pick(benchmark: Any, servers: int) -> None:
    """A probe reports a weight (as X-LB-Weight does every interval); the next pick rebuilds the
    smooth weighted period, whose length is the sum of the weights in hundredths of a ratio unit."""
    pool = make_pool("dynamic_ratio", servers)
    pool.pick()
    server = pool.servers[0]
    percentages = itertools.cycle((37, 80, 51, 100))

    def report() -> None:
        pool.set_weight(server, next(percentages))

    # One round for 400 servers: a rebuild there takes seconds.
    benchmark.pedantic(pool.pick, setup=report, rounds=1 if servers >= 400 else 10, warmup_rounds=0)
