"""The balancing policies, through `Pool` (and directly where clearer): shares, exclusions, fairness.

Sans-IO and mostly property-based: hypothesis draws pools, exclusions and histories of events, and the
tests check the invariants the issue promises (exact shares over windows, excluded servers never
picked, rejoin fairness, least in-flight per unit of weight, backup servers only as a last resort).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lbproxy.balancing import LeastConnections, Ratio, RoundRobin, make_policy, smooth_weighted_schedule
from lbproxy.config import Address, PolicyName, PoolConfig, ServerConfig
from lbproxy.pool import WEIGHT_SCALE, AdminState, Pool, Server

POLICIES: tuple[PolicyName, ...] = ("round_robin", "least_connections", "ratio", "dynamic_ratio")
NAMES = "abcdefgh"

Exclusion = Literal["down", "draining", "disabled", "weight 0"]
EXCLUSIONS: tuple[Exclusion, ...] = ("down", "draining", "disabled", "weight 0")

QUICK = settings(max_examples=60, deadline=None)
THOROUGH = settings(max_examples=150, deadline=None)


def make_pool(ratios: Sequence[int], policy: PolicyName = "round_robin", backups: Collection[int] = ()) -> Pool:
    """A pool of servers named a, b, c... with these ratios; `backups` are indexes of backup servers."""
    servers = tuple(
        ServerConfig(name=NAMES[i], address=Address("10.0.0.1", 8001 + i), ratio=ratio, backup=i in backups)
        for i, ratio in enumerate(ratios)
    )
    return Pool(PoolConfig(name="farm", servers=servers, policy=policy))


def serve(pool: Pool, count: int) -> list[str]:
    """The names of the servers picked for `count` sequential requests (each taken, then released)."""
    names = []
    for _ in range(count):
        server = pool.pick()
        assert server is not None
        pool.taken(server)
        pool.released(server)
        names.append(server.name)
    return names


def exclude(pool: Pool, server: Server, how: Exclusion) -> None:
    if how == "down":
        pool.set_health(server, False)
    elif how == "draining":
        pool.set_admin(server, AdminState.DRAINING)
    elif how == "disabled":
        pool.set_admin(server, AdminState.DISABLED)
    else:
        pool.set_weight(server, 0)


def readmit(pool: Pool, server: Server, how: Exclusion) -> None:
    if how == "down":
        pool.set_health(server, True)
    elif how in ("draining", "disabled"):
        pool.set_admin(server, AdminState.ENABLED)
    else:
        pool.set_weight(server, 100)


def available(pool: Pool) -> list[Server]:
    return [server for server in pool.servers if server.available]


def assert_window_shares(picks: Sequence[str], shares: dict[str, int]) -> None:
    """Every window of sum(shares) consecutive picks holds each server exactly its share."""
    size = sum(shares.values())
    assert len(picks) >= size
    expected = Counter(shares)
    counts = Counter(picks[:size])
    assert counts == expected, f"window 0 of {picks}"
    for start in range(1, len(picks) - size + 1):
        counts[picks[start - 1]] -= 1
        counts[picks[start + size - 1]] += 1
        assert counts == expected, f"window {start} of {picks}"


ratios_strategy = st.lists(st.integers(1, 20), min_size=1, max_size=8)


@st.composite
def exclusions(draw: st.DrawFn, size: int) -> dict[int, Exclusion]:
    """Some of `size` servers, each with the way it is taken out of the rotation."""
    indexes = draw(st.sets(st.integers(0, size - 1)))
    return {index: draw(st.sampled_from(EXCLUSIONS)) for index in sorted(indexes)}


# -- round_robin --------------------------------------------------------------------------------


def test_round_robin_rotates_in_configuration_order() -> None:
    assert "".join(serve(make_pool([1, 1, 1, 1]), 12)) == "abcd" * 3


def test_round_robin_ignores_ratios() -> None:
    assert "".join(serve(make_pool([5, 1, 2]), 6)) == "abcabc"


@THOROUGH
@given(size=st.integers(1, 8), warmup=st.integers(0, 10), data=st.data())
def test_round_robin_equal_shares_and_exclusions(size: int, warmup: int, data: st.DataObject) -> None:
    pool = make_pool([1] * size)
    serve(pool, warmup)
    for index, how in data.draw(exclusions(size)).items():
        exclude(pool, pool.servers[index], how)
    left = [server.name for server in available(pool)]
    if not left:
        assert pool.pick() is None
        assert pool.pick() is None
        return
    picks = serve(pool, 3 * len(left) + data.draw(st.integers(0, len(left))))
    assert set(picks) <= set(left)  # an excluded server is never picked
    assert_window_shares(picks, dict.fromkeys(left, 1))
    for before, after in itertools.pairwise(picks):  # strict rotation in configuration order
        assert left.index(after) == (left.index(before) + 1) % len(left)


# A history: events (a server leaves, or one that left rejoins) with some picks after each one. The
# server is given by its index, or None for the server picked last: the case where a rotation can slip.
Event = tuple[int | None, Exclusion, int]
history_strategy = st.lists(
    st.tuples(st.one_of(st.none(), st.integers(0, 7)), st.sampled_from(EXCLUSIONS), st.integers(0, 12)),
    min_size=1,
    max_size=12,
)


def replay(pool: Pool, history: list[Event], last: str | None) -> list[tuple[list[str], list[str]]]:
    """Play `history` on `pool` (`last`: the server picked before it, if any).

    Each event takes server `index % size` out of the rotation, or readmits it if it was out, then
    makes its picks. Returns, per event, the names of the available servers after it and the picks.
    """
    gone: dict[int, Exclusion] = {}
    played = []
    for index, how, count in history:
        if index is None:
            index = NAMES.index(last) if last is not None else 0
        index %= len(pool.servers)
        if index in gone:
            readmit(pool, pool.servers[index], gone.pop(index))
        else:
            exclude(pool, pool.servers[index], how)
            gone[index] = how
        left = [server.name for server in available(pool)]
        picks = serve(pool, count) if left else []
        last = picks[-1] if picks else last
        played.append((left, picks))
    return played


@THOROUGH
@given(size=st.integers(2, 8), warmup=st.integers(0, 8), history=history_strategy, rotations=st.integers(1, 3))
def test_rotation_is_fair_after_servers_leave_and_rejoin(
    size: int, warmup: int, history: list[Event], rotations: int
) -> None:
    """After any change, every window of len(available) picks gives each available server one turn.

    Holds for round_robin, and for least_connections under sequential traffic (all at 0 in flight:
    ties go to the server picked longest ago, a rotation too).
    """
    for policy in ("round_robin", "least_connections"):
        pool = make_pool([1] * size, policy)
        before = serve(pool, warmup)
        for left, picks in replay(pool, history, before[-1] if before else None):
            assert set(picks) <= set(left)
            if len(picks) >= len(left):
                assert_window_shares(picks, dict.fromkeys(left, 1))
        left = [server.name for server in available(pool)]
        if left:
            after = serve(pool, rotations * len(left))
            assert Counter(after) == dict.fromkeys(left, rotations)
        else:
            assert pool.pick() is None


@THOROUGH
@given(size=st.integers(2, 8), warmup=st.integers(0, 8), history=history_strategy)
def test_round_robin_never_gives_a_server_two_turns_in_a_row(size: int, warmup: int, history: list[Event]) -> None:
    """Unless it was, at some moment in between, the only server left."""
    pool = make_pool([1] * size)
    picks = serve(pool, warmup)
    fewest = size  # the fewest servers available since the last pick
    for left, after in replay(pool, history, picks[-1] if picks else None):
        fewest = min(fewest, len(left))
        for name in after:
            if picks and fewest >= 2:
                assert name != picks[-1], f"{name} twice in a row: {[*picks, name]}"
            picks.append(name)
            fewest = len(left)


def test_round_robin_server_that_flaps_right_after_its_turn_waits_for_the_rotation() -> None:
    pool = make_pool([1, 1, 1])
    b = pool.by_name["b"]
    assert serve(pool, 2) == ["a", "b"]
    pool.set_health(b, False)
    pool.set_health(b, True)
    assert serve(pool, 4) == ["c", "a", "b", "c"]


def test_round_robin_rejoining_server_takes_its_turn_at_its_place() -> None:
    pool = make_pool([1, 1, 1, 1])
    c = pool.by_name["c"]
    pool.set_admin(c, AdminState.DRAINING)
    assert serve(pool, 4) == ["a", "b", "d", "a"]
    pool.set_admin(c, AdminState.ENABLED)
    assert serve(pool, 5) == ["b", "c", "d", "a", "b"]


# -- ratio --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["ratio", "dynamic_ratio"])
def test_ratio_5_1_1_is_interleaved(policy: PolicyName) -> None:
    assert "".join(serve(make_pool([5, 1, 1], policy), 14)) == "aabacaa" * 2


@dataclass(eq=False)  # hashable by identity, as servers are
class Stub:
    name: str
    weight: int = 1
    inflight: int = 0


def test_ratio_policy_directly() -> None:
    a, b, c = Stub("a", 5), Stub("b", 1), Stub("c", 1)
    policy: Ratio[Stub] = Ratio([a, b, c])
    assert policy.pick() is None
    for server in (c, a, b):  # the order of becoming available does not matter: configuration order does
        policy.add(server)
    assert "".join(s.name for s in (policy.pick() for _ in range(7)) if s) == "aabacaa"
    b.weight = 3
    policy.weight_changed(b)
    policy.remove(c)
    assert Counter(s.name for s in (policy.pick() for _ in range(8)) if s) == {"a": 5, "b": 3}


def test_smooth_weighted_schedule() -> None:
    assert "".join(smooth_weighted_schedule("abc", [5, 1, 1])) == "aabacaa"
    assert "".join(smooth_weighted_schedule("abc", [10, 2, 2])) == "aabacaa"  # divided by the gcd
    assert "".join(smooth_weighted_schedule("abc", [3, 3, 3])) == "abc"
    assert smooth_weighted_schedule("", []) == []


@THOROUGH
@given(ratios=ratios_strategy, policy=st.sampled_from(["ratio", "dynamic_ratio"]), extra=st.integers(0, 20))
def test_ratio_exact_shares_over_any_window(ratios: list[int], policy: PolicyName, extra: int) -> None:
    pool = make_pool(ratios, policy)
    picks = serve(pool, 2 * sum(ratios) + extra)
    assert_window_shares(picks, {NAMES[i]: ratio for i, ratio in enumerate(ratios)})


def assert_smooth(picks: Sequence[str], weights: dict[str, int]) -> None:
    """The bounds nginx's smooth weighted round robin provably keeps, on every prefix of a period.

    With n servers and total weight W, server i's count after t picks, c_i(t), stays within
    t*w_i/W - (n-1)^2/n <= c_i(t) <= t*w_i/W + (n-1)/n. Proof: the algorithm's `current_i` is
    t*w_i - W*c_i(t); the server picked had the largest current after the increment, at least W/n (the
    currents then sum to W), so after subtracting W every current stays >= -W(n-1)/n; they sum to 0,
    so each is at most (n-1) * W(n-1)/n. The upper bound implies c_i(t) <= ceil(t*w_i/W): a server is
    never ahead of its share by a whole pick. "Within 1 of t*w_i/W" does NOT hold for the lag: with
    weights 1:1:1:7:7:7 the sixth server has 3 picks after 14, against a share of 49/12 (lag 13/12).
    With two servers both bounds are 1/2.
    """
    n = len(weights)
    total = sum(weights.values())
    counts = Counter[str]()
    for t, name in enumerate(picks, start=1):
        counts[name] += 1
        for server, weight in weights.items():
            ahead = counts[server] * total - t * weight  # (c_i(t) - t*w_i/W) * W
            assert n * ahead <= (n - 1) * total, f"{server} ahead after {t}: {''.join(picks[:t])}"
            assert -n * ahead <= (n - 1) ** 2 * total, f"{server} behind after {t}: {''.join(picks[:t])}"
            assert counts[server] <= -(-t * weight // total)  # ceil(t*w_i/W)


@THOROUGH
@given(ratios=ratios_strategy)
def test_ratio_is_smooth(ratios: list[int]) -> None:
    pool = make_pool(ratios, "ratio")
    weights = {NAMES[i]: ratio for i, ratio in enumerate(ratios)}
    assert_smooth(serve(pool, sum(ratios)), weights)


@THOROUGH
@given(ratios=ratios_strategy, warmup=st.integers(0, 30), data=st.data())
def test_ratio_exclusions_are_honoured(ratios: list[int], warmup: int, data: st.DataObject) -> None:
    pool = make_pool(ratios, "ratio")
    serve(pool, warmup)
    for index, how in data.draw(exclusions(len(ratios))).items():
        exclude(pool, pool.servers[index], how)
    left = {server.name: server.ratio for server in available(pool)}
    if not left:
        assert pool.pick() is None
        return
    picks = serve(pool, 2 * sum(left.values()))
    assert set(picks) <= set(left)
    assert_window_shares(picks, left)


@QUICK
@given(ratios=st.lists(st.integers(1, 6), min_size=2, max_size=6), history=history_strategy, periods=st.integers(1, 3))
def test_ratio_shares_are_exact_after_servers_leave_and_rejoin(
    ratios: list[int], history: list[Event], periods: int
) -> None:
    pool = make_pool(ratios, "ratio")
    for left, picks in replay(pool, history, None):
        assert set(picks) <= set(left)
    left = {server.name: server.ratio for server in available(pool)}
    if not left:
        assert pool.pick() is None
        return
    picks = serve(pool, periods * sum(left.values()))
    assert Counter(picks) == {name: periods * ratio for name, ratio in left.items()}
    assert_window_shares(picks, left)


# -- dynamic_ratio ------------------------------------------------------------------------------


def test_dynamic_ratio_weight_is_a_percentage_of_the_ratio() -> None:
    pool = make_pool([4, 4, 1], "dynamic_ratio")
    a, b, c = pool.servers
    pool.set_weight(a, 50)
    assert a.weight == 2 * WEIGHT_SCALE
    assert Counter(serve(pool, 7 * 3)) == {"a": 2 * 3, "b": 4 * 3, "c": 1 * 3}
    pool.set_weight(c, 1)
    assert c.weight == WEIGHT_SCALE // 100  # 1% of 1 is not 0: a non-zero percentage always gets some traffic
    pool.set_weight(b, 0)
    assert b.weight == 0
    picks = serve(pool, 201)  # a at 50% of 4 against c at 1% of 1: 200 to 1, exactly, per period
    assert "b" not in picks
    assert Counter(picks) == {"a": 200, "c": 1}
    pool.set_weight(a, 0)
    pool.set_weight(c, 0)
    assert pool.pick() is None
    pool.set_weight(b, 100)
    assert serve(pool, 3) == ["b", "b", "b"]


@THOROUGH
@given(
    ratios=ratios_strategy,
    percents=st.lists(st.one_of(st.integers(0, 100), st.sampled_from([0, 1, 50, 99, 100])), min_size=8, max_size=8),
)
def test_dynamic_ratio_shares_follow_reported_weights(ratios: list[int], percents: list[int]) -> None:
    pool = make_pool(ratios, "dynamic_ratio")
    serve(pool, 3)
    for server, percent in zip(pool.servers, percents, strict=False):
        pool.set_weight(server, percent)
        assert server.weight == server.ratio * percent * WEIGHT_SCALE // 100  # exact, in hundredths
        assert (server.weight > 0) == (percent > 0)
    weights = {server.name: server.weight for server in pool.servers if server.weight}
    if not weights:
        assert pool.pick() is None
        return
    divisor = math.gcd(*weights.values())
    weights = {name: weight // divisor for name, weight in weights.items()}
    picks = serve(pool, 2 * sum(weights.values()))
    assert_window_shares(picks, weights)


@pytest.mark.parametrize("percent", [0, 25, 60])
def test_dynamic_ratio_server_back_up_starts_at_its_ratio(percent: int) -> None:
    pool = make_pool([4, 2], "dynamic_ratio")
    a = pool.by_name["a"]
    pool.set_weight(a, percent)
    assert a.weight == {0: 0, 25: 100, 60: 240}[percent]
    pool.set_health(a, False)
    assert "a" not in serve(pool, 4)
    pool.set_health(a, True)
    assert a.weight == 4 * WEIGHT_SCALE
    assert "".join(serve(pool, 12)) == "aba" * 4  # 4:2 divided by their gcd


def test_dynamic_ratio_weight_set_while_down_is_reset_when_up() -> None:
    pool = make_pool([3, 3], "dynamic_ratio")
    a = pool.by_name["a"]
    pool.set_health(a, False)
    pool.set_weight(a, 10)
    assert "a" not in serve(pool, 3)
    pool.set_health(a, True)
    assert a.weight == 3 * WEIGHT_SCALE


@pytest.mark.parametrize("percent", [-1, 101])
def test_weight_percentage_out_of_range_is_refused(percent: int) -> None:
    pool = make_pool([1], "dynamic_ratio")
    with pytest.raises(ValueError, match="from 0 to 100"):
        pool.set_weight(pool.servers[0], percent)
    assert pool.servers[0].weight == WEIGHT_SCALE


# -- least_connections --------------------------------------------------------------------------


def assert_least_loaded(picked: Server | None, pool: Pool) -> None:
    """`picked` has the smallest inflight/weight among the available servers of its group."""
    assert picked is not None
    assert picked.available
    group = [server for server in available(pool) if server.backup == picked.backup]
    for other in group:  # cross-multiplied: exact
        assert picked.inflight * other.weight <= other.inflight * picked.weight, (picked, other)


@THOROUGH
@given(
    ratios=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    steps=st.lists(st.one_of(st.none(), st.integers(0, 1000)), max_size=60),
    data=st.data(),
)
def test_least_connections_picks_the_least_loaded(
    ratios: list[int], steps: list[int | None], data: st.DataObject
) -> None:
    """Steps: None takes a request on the pick, an integer releases one of those held."""
    pool = make_pool(ratios, "least_connections")
    for index, how in data.draw(exclusions(len(ratios))).items():
        exclude(pool, pool.servers[index], how)
    held: list[Server] = []
    for step in steps:
        if step is None or not held:
            picked = pool.pick()
            if not available(pool):
                assert picked is None
                continue
            assert_least_loaded(picked, pool)
            assert picked is not None
            pool.taken(picked)
            held.append(picked)
        else:
            pool.released(held.pop(step % len(held)))
    assert all(server.inflight == held.count(server) for server in pool.servers)


def test_least_connections_with_uneven_load() -> None:
    pool = make_pool([1, 1, 1], "least_connections")
    a, b, c = pool.servers
    for server, count in ((a, 3), (b, 1), (c, 2)):
        for _ in range(count):
            pool.taken(server)
    assert pool.pick() is b
    pool.taken(b)
    pool.taken(b)
    assert pool.pick() is c
    pool.released(a)
    pool.released(a)
    assert pool.pick() is a


@pytest.mark.parametrize("size", [2, 3, 5])
def test_least_connections_equal_servers_share_sequential_traffic_evenly(size: int) -> None:
    pool = make_pool([1] * size, "least_connections")
    picks = serve(pool, 6 * size)
    assert_window_shares(picks, dict.fromkeys(NAMES[:size], 1))


def test_least_connections_ratios_under_held_connections_converge() -> None:
    pool = make_pool([3, 1], "least_connections")
    a, b = pool.servers
    for _ in range(400):
        picked = pool.pick()
        assert_least_loaded(picked, pool)
        assert picked is not None
        pool.taken(picked)
        assert abs(a.inflight - 3 * b.inflight) <= 3  # a/3 and b within one connection of each other
    assert (a.inflight, b.inflight) == (300, 100)


def test_least_connections_policy_directly() -> None:
    a, b = Stub("a", weight=2), Stub("b", weight=1)
    policy: LeastConnections[Stub] = LeastConnections([a, b])
    assert policy.pick() is None
    policy.add(a)
    policy.add(b)
    a.inflight = 3
    policy.taken(a)
    b.inflight = 1
    policy.taken(b)
    assert policy.pick() is b  # 1/1 < 3/2
    b.weight = 4
    policy.weight_changed(b)
    b.inflight = 2
    policy.taken(b)
    assert policy.pick() is b  # 2/4 < 3/2
    policy.remove(b)
    assert policy.pick() is a


def test_round_robin_policy_directly() -> None:
    a, b, c = Stub("a"), Stub("b"), Stub("c")
    policy: RoundRobin[Stub] = RoundRobin([a, b, c])
    for server in (a, b, c, b):  # adding twice does not make two turns
        policy.add(server)
    assert [policy.pick() for _ in range(4)] == [a, b, c, a]
    policy.remove(b)
    policy.remove(b)
    assert [policy.pick() for _ in range(3)] == [c, a, c]


def test_make_policy_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest", [])


# -- backup servers -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_backup_servers_serve_only_when_no_primary_is_available(policy: PolicyName) -> None:
    pool = make_pool([1, 1, 1, 1], policy, backups={2, 3})
    a, b, c, d = pool.servers
    assert set(serve(pool, 8)) == {"a", "b"}
    pool.set_health(a, False)
    assert set(serve(pool, 4)) == {"b"}
    pool.set_admin(b, AdminState.DRAINING)
    assert Counter(serve(pool, 8)) == {"c": 4, "d": 4}
    pool.set_health(a, True)  # a primary is back: it takes over at once
    assert set(serve(pool, 4)) == {"a"}
    pool.set_health(a, False)
    pool.set_weight(c, 0)
    pool.set_admin(d, AdminState.DISABLED)
    assert pool.pick() is None
    pool.set_admin(b, AdminState.ENABLED)
    assert set(serve(pool, 3)) == {"b"}


def test_pool_of_backups_only_serves() -> None:
    pool = make_pool([1, 1], "round_robin", backups={0, 1})
    assert serve(pool, 4) == ["a", "b", "a", "b"]


# -- the pool as a state machine ----------------------------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Random health, admin and weight changes, picks, takes and releases on a random pool."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool([1])
        self.held: list[Server] = []

    @initialize(
        policy=st.sampled_from(POLICIES),
        servers=st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=6),
    )
    def build(self, policy: PolicyName, servers: list[tuple[int, bool]]) -> None:
        ratios = [ratio for ratio, _ in servers]
        self.pool = make_pool(ratios, policy, backups={i for i, (_, backup) in enumerate(servers) if backup})

    def server(self, index: int) -> Server:
        return self.pool.servers[index % len(self.pool.servers)]

    @rule(index=st.integers(0, 5), up=st.booleans())
    def set_health(self, index: int, up: bool) -> None:
        self.pool.set_health(self.server(index), up)

    @rule(index=st.integers(0, 5), state=st.sampled_from(AdminState))
    def set_admin(self, index: int, state: AdminState) -> None:
        self.pool.set_admin(self.server(index), state)

    @rule(index=st.integers(0, 5), percent=st.one_of(st.sampled_from([0, 1, 100]), st.integers(0, 100)))
    def set_weight(self, index: int, percent: int) -> None:
        self.pool.set_weight(self.server(index), percent)

    @rule(index=st.integers(0, 5))
    def restore(self, index: int) -> None:
        """Up, enabled and at full weight: without this, random changes leave few servers available."""
        server = self.server(index)
        self.pool.set_health(server, True)
        self.pool.set_admin(server, AdminState.ENABLED)
        self.pool.set_weight(server, 100)

    @rule()
    def pick(self) -> None:
        self.check(self.pool.pick())

    @rule(count=st.integers(1, 6))
    def take(self, count: int) -> None:
        """`count` requests, held open: uneven in-flight counts for least_connections."""
        for _ in range(count):
            picked = self.pool.pick()
            self.check(picked)
            if picked is not None:
                self.pool.taken(picked)
                self.held.append(picked)

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(0, 1000))
    def release(self, index: int) -> None:
        self.pool.released(self.held.pop(index % len(self.held)))

    def check(self, picked: Server | None) -> None:
        left = available(self.pool)
        primaries = [server for server in left if not server.backup]
        assert (picked is None) == (not left)  # None exactly when no server of either group is available
        if picked is None:
            return
        assert picked.available
        assert picked.backup == (not primaries)  # a backup only when no primary is available
        if self.pool.policy_name == "least_connections":
            assert_least_loaded(picked, self.pool)

    @invariant()
    def inflight_counts_what_is_held(self) -> None:
        for server in self.pool.servers:
            assert server.inflight == self.held.count(server)
            assert server.weight >= 0


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_long_weighted_period_switches_to_stride_scheduling_and_keeps_shares() -> None:
    """400 servers, one reporting 37%: a precomputed period would block the loop for seconds."""
    servers = tuple(ServerConfig(f"s{i}", Address("10.0.0.1", 1000 + i), ratio=1 + i % 5) for i in range(400))
    pool = Pool(PoolConfig("p", servers, policy="dynamic_ratio"))
    pool.set_weight(pool.servers[0], 37)
    total = sum(server.weight for server in pool.servers)
    picks = Counter(server.name for server in (pool.pick() for _ in range(total)) if server is not None)
    for server in pool.servers:
        assert abs(picks[server.name] - server.weight) <= 1, server  # one period: each within one pick
