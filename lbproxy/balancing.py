"""Balancing policies: which available server gets the next request or connection.

A policy orders servers; it does not own them (the pool does) and it knows nothing of health, admin
state or sockets. As HAProxy's `lbprm` hooks do, the pool tells a policy about every event that can
change its answer (a server became available or unavailable, its weight changed, a request was taken
or released), and the policy keeps its own structure current so that `pick()` never scans the server
list and allocates nothing: it runs once per request.

Policies read two attributes of a server: `inflight` (requests or connections in progress) and
`weight` (the live weight, >= 1 while the server is available).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from heapq import heapify, heapreplace
from typing import Generic, Protocol, TypeVar

from mypy_extensions import trait


class Candidate(Protocol):
    """What a policy reads from a server. Servers must be hashable by identity."""

    @property
    def inflight(self) -> int: ...

    @property
    def weight(self) -> int: ...


S = TypeVar("S", bound=Candidate)


@trait
class Policy(Generic[S]):
    """The interface every policy implements; `servers` given at construction fix each one's place.
    A trait every policy inherits, so that the pool's compiled calls go straight to it (see
    `request_head.Settings`)."""

    __slots__ = ()

    # Whether picks depend on in-flight counts: only then need `taken` and `released` be called.
    follows_inflight: bool

    @abstractmethod
    def pick(self) -> S | None:
        """The server for the next request, or None when no server is available."""
        raise NotImplementedError

    @abstractmethod
    def add(self, server: S) -> None:
        """`server` became available (up, enabled, weight > 0)."""
        raise NotImplementedError

    @abstractmethod
    def remove(self, server: S) -> None:
        """`server` is no longer available."""
        raise NotImplementedError

    @abstractmethod
    def weight_changed(self, server: S) -> None:
        """The live weight of an available server changed."""
        raise NotImplementedError

    @abstractmethod
    def taken(self, server: S) -> None:
        """A request or connection was sent to `server` (its inflight count already went up)."""
        raise NotImplementedError

    @abstractmethod
    def released(self, server: S) -> None:
        """A request or connection to `server` ended (its inflight count already went down)."""
        raise NotImplementedError


class RoundRobin(Policy[S]):
    """Strict rotation over the available servers, in configuration order.

    The cursor is the configuration position of the last server picked, not an index into the list
    of available servers: the next pick is the first available server after it. A server leaving or
    rejoining therefore skews nobody's share, and a rejoining server takes its turn when the
    rotation next reaches its place (never twice in a row). A pick is one C-level bisect.
    """

    __slots__ = ("_order", "_ring", "_positions", "_last")
    follows_inflight = False

    def __init__(self, servers: Sequence[S]) -> None:
        self._order = {server: index for index, server in enumerate(servers)}
        self._ring: list[S] = []  # available servers, in configuration order
        self._positions: list[int] = []  # their configuration positions, for bisect
        self._last = -1

    def pick(self) -> S | None:
        positions = self._positions
        if not positions:
            return None
        index = bisect_right(positions, self._last)
        if index == len(positions):
            index = 0
        self._last = positions[index]
        return self._ring[index]

    def add(self, server: S) -> None:
        position = self._order[server]
        index = bisect_left(self._positions, position)
        if index < len(self._positions) and self._positions[index] == position:
            return
        self._positions.insert(index, position)
        self._ring.insert(index, server)

    def remove(self, server: S) -> None:
        position = self._order[server]
        index = bisect_left(self._positions, position)
        if index < len(self._positions) and self._positions[index] == position:
            del self._positions[index]
            del self._ring[index]

    def weight_changed(self, server: S) -> None:
        pass

    def taken(self, server: S) -> None:
        pass

    def released(self, server: S) -> None:
        pass


SCHEDULE_BUDGET = 200_000  # steps of a precomputed period (its length x servers): ~20 ms of Python


class Ratio(Policy[S]):
    """Smooth weighted round robin (nginx's algorithm): 5:1:1 gives `a a b a c a a`, interleaved.

    The sequence is periodic with period sum(weights) and holds each server exactly `weight` times per
    period, so any window of sum(weights) consecutive picks gives each server exactly its weight.
    The period is computed once per change of the available set or of a weight (lazily, at the next
    pick, so a burst of changes costs one rebuild) and then replayed: `pick()` is O(1). A rebuild costs
    O(period x servers), with weights first divided by their common divisor; past SCHEDULE_BUDGET
    (hundreds of servers with fractional live weights) it switches to stride scheduling on a heap.

    Serves both `ratio` (configured weights) and `dynamic_ratio` (weights reported at run time).
    """

    __slots__ = ("_order", "_members", "_schedule", "_next", "_dirty", "_heap", "_strides", "_stride_members")
    follows_inflight = False

    def __init__(self, servers: Sequence[S]) -> None:
        self._order = {server: index for index, server in enumerate(servers)}
        self._members: list[S] = []
        self._schedule: list[S] = []
        self._next = 0
        self._dirty = False
        # Past SCHEDULE_BUDGET, stride scheduling instead of a precomputed period (see _rebuild).
        self._heap: list[tuple[float, int]] = []
        self._strides: list[float] = []
        self._stride_members: list[S] = []

    def pick(self) -> S | None:
        if self._dirty:
            self._rebuild()
        heap = self._heap
        if heap:
            passed, index = heap[0]
            heapreplace(heap, (passed + self._strides[index], index))
            return self._stride_members[index]
        schedule = self._schedule
        if not schedule:
            return None
        index = self._next
        if index >= len(schedule):
            index = 0
        self._next = index + 1
        return schedule[index]

    def add(self, server: S) -> None:
        if server not in self._members:
            position = bisect_left(self._members, self._order[server], key=self._order.__getitem__)
            self._members.insert(position, server)
            self._dirty = True

    def remove(self, server: S) -> None:
        if server in self._members:
            self._members.remove(server)
            self._dirty = True

    def weight_changed(self, server: S) -> None:
        if server in self._members:
            self._dirty = True

    def taken(self, server: S) -> None:
        pass

    def released(self, server: S) -> None:
        pass

    def _rebuild(self) -> None:
        self._dirty = False
        members = [server for server in self._members if server.weight > 0]
        weights = [server.weight for server in members]
        divisor = math.gcd(*weights) if weights else 1
        if sum(weights) // divisor * len(members) > SCHEDULE_BUDGET:
            # A period this long (many servers with fractional live weights: dynamic_ratio reports,
            # slow starts) would take the event loop too long to compute. Stride scheduling gives
            # the same long-run shares with at most one pick of lag per server, O(log n) a pick.
            self._schedule = []
            self._stride_members = members
            self._strides = [1.0 / weight for weight in weights]
            self._heap = [(stride / 2, index) for index, stride in enumerate(self._strides)]
            heapify(self._heap)
            return
        self._heap = []
        before = len(self._schedule)
        self._schedule = smooth_weighted_schedule(members, weights)
        # Carry the cursor over in proportion, so that frequent changes do not keep restarting the
        # period and favour the servers at its beginning.
        self._next = self._next * len(self._schedule) // before if before else 0


T = TypeVar("T")


def smooth_weighted_schedule(items: Sequence[T], weights: Sequence[int]) -> list[T]:
    """One period of nginx's smooth weighted round robin over `items`; ties go to the earlier item."""
    if not items:
        return []
    divisor = math.gcd(*weights)
    weights = [weight // divisor for weight in weights]
    if len(set(weights)) == 1:
        return list(items)  # equal weights: the rotation itself
    total = sum(weights)
    current = [0] * len(items)
    schedule: list[T] = []
    for _ in range(total):
        best = 0
        for index, weight in enumerate(weights):
            current[index] += weight
            if current[index] > current[best]:
                best = index
        current[best] -= total
        schedule.append(items[best])
    return schedule


class LeastConnections(Policy[S]):
    """The available server with the fewest in-flight requests per unit of weight.

    A tournament tree over the servers keeps the winner at the root: `pick()` is O(1) and each event
    re-plays one leaf-to-root path, O(log n). Ties go to the server picked longest ago, which makes
    equal servers rotate (and share evenly) rather than the first one soaking up sequential traffic.
    """

    __slots__ = ("_servers", "_index", "_live", "_stamp", "_clock", "_tree", "_size")
    follows_inflight = True

    def __init__(self, servers: Sequence[S]) -> None:
        self._servers = list(servers)
        self._index = {server: index for index, server in enumerate(self._servers)}
        self._live = [False] * len(self._servers)
        self._stamp = [0] * len(self._servers)
        self._clock = 0
        size = 1
        while size < len(self._servers):
            size *= 2
        self._size = size
        self._tree = [-1] * (2 * size)  # node -> index of the winning server below it, -1 for none

    def pick(self) -> S | None:
        winner = self._tree[1]
        return None if winner < 0 else self._servers[winner]

    def add(self, server: S) -> None:
        index = self._index[server]
        self._live[index] = True
        self._replay(index)

    def remove(self, server: S) -> None:
        index = self._index[server]
        self._live[index] = False
        self._replay(index)

    def weight_changed(self, server: S) -> None:
        self._replay(self._index[server])

    def taken(self, server: S) -> None:
        index = self._index[server]
        self._clock += 1
        self._stamp[index] = self._clock
        self._replay(index)

    def released(self, server: S) -> None:
        self._replay(self._index[server])

    def _replay(self, index: int) -> None:
        tree = self._tree
        node = self._size + index
        tree[node] = index if self._live[index] else -1
        node >>= 1
        while node:
            left = tree[2 * node]
            right = tree[2 * node + 1]
            tree[node] = left if self._beats(left, right) else right
            node >>= 1

    def _beats(self, a: int, b: int) -> bool:
        if a < 0:
            return False
        if b < 0:
            return True
        first = self._servers[a]
        second = self._servers[b]
        # inflight/weight compared by cross-multiplying: exact, no floats
        lhs = first.inflight * second.weight
        rhs = second.inflight * first.weight
        if lhs != rhs:
            return lhs < rhs
        return self._stamp[a] <= self._stamp[b]  # never picked yet (both 0): configuration order


def make_policy(name: str, servers: Sequence[S]) -> Policy[S]:
    """The policy called `name` in the config (`round_robin`, `least_connections`, `ratio`, `dynamic_ratio`)."""
    if name == "round_robin":
        return RoundRobin(servers)
    if name == "least_connections":
        return LeastConnections(servers)
    if name in ("ratio", "dynamic_ratio"):
        return Ratio(servers)
    raise ValueError(f"unknown policy {name!r}")
