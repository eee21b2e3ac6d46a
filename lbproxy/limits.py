"""How much the servers and the clients may ask: per-server limits with the pool's queue, and
per-client rate limits. Plain code, no I/O: the time is passed in.

**Limits and the queue** (HAProxy's `maxconn` and `pendconn`). A server with `max_connections`
takes at most that many requests (http) or connections (tcp) at once; the pool skips a server at its
limit. When no server the pool would use has room, the request waits in the pool's `Queue`, holding
a `Ticket` (its protocol holds the head, and reads on only to see the client leave). When a server
frees a slot (`Pool.released`), the oldest ticket it can take is served by that server at once: its slot is
taken for the ticket before the ticket's protocol hears of it, so nothing overtakes a request that
waited. A ticket may wait for one server (persistence keeps a user on theirs while it is up) or for
any server of the pool; a server frees its slot to the older of the oldest ticket for it and the
oldest for any. A ticket whose client went away is cancelled where it stands (lazily: skipped when
it comes up); one that waited `timeout` is given up by its protocol (503). A full queue refuses at
once (503). A server that goes down, or is disabled, hands its own tickets back to their protocols,
which choose again (`Ticket.ready(None)`); a pool with no server left hands back every ticket.

**Who the client is.** Behind another proxy, every request comes from that proxy's address.
`TrustedProxies` names the proxies whose `X-Forwarded-For` may say who the client is: the client
is then the rightmost address in it that is not a trusted proxy (each trusted hop vouches for the
one before it; anything further left could have been written by the client itself).

**Rate limits.** A `RateLimiter` is a token bucket per client key (an address or a header's value),
`rate` tokens a second up to `burst`; a request takes one token or is refused with the seconds until
one is there (Retry-After). At most `capacity` keys are kept; the least recently seen is forgotten
first (it comes back with a full bucket), so memory is bounded however many clients come.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

S = TypeVar("S")  # a server (pool.Server); generic so that this module imports nothing of lbproxy's

# Upper bounds of the queue-wait histogram, in seconds.
WAIT_BOUNDS: Final[tuple[float, ...]] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

FULL: Final = "full"
TIMEOUT: Final = "timeout"


class Ticket(Generic[S]):
    """One request (or connection) waiting in a pool's queue: its protocol's handle.

    `ready(server)` is called once: with the server whose slot was taken for it, or with None when
    it must choose again (its server went down, the pool lost every server, a reload changed it).
    """

    __slots__ = ("line", "ready", "server", "since", "number", "live")

    def __init__(
        self, line: Queue[S], ready: Callable[[S | None], None], server: S | None, since: float, number: int
    ) -> None:
        self.line = line
        self.ready = ready
        self.server = server  # the one server it waits for (persistence), or None: any
        self.since = since
        self.number = number  # its place in the pool's line: older tickets have smaller numbers
        self.live = True  # False once served, handed back or cancelled

    def cancel(self) -> None:
        """The client went away: the ticket leaves the line (it is skipped when it comes up)."""
        if self.live:
            self.live = False
            self.line.length -= 1

    def timed_out(self) -> None:
        """The ticket waited the queue's `timeout`: its protocol refuses the request (503)."""
        if self.live:
            self.cancel()
            self.line.rejections[TIMEOUT] += 1


class Queue(Generic[S]):
    """A pool's waiting line: tickets for any server beside tickets for one server, FIFO by number."""

    __slots__ = (
        "max_size",
        "timeout",
        "anyone",
        "by_server",
        "length",
        "numbered",
        "rejections",
        "waits",
        "wait_sum",
    )

    def __init__(self, max_size: int, timeout: float) -> None:
        self.max_size = max_size
        self.timeout = timeout
        self.anyone: deque[Ticket[S]] = deque()
        self.by_server: dict[S, deque[Ticket[S]]] = {}
        self.length = 0  # live tickets
        self.numbered = 0
        self.rejections = {FULL: 0, TIMEOUT: 0}
        self.waits = [0] * (len(WAIT_BOUNDS) + 1)  # served tickets' waits, per bucket; last: +Inf
        self.wait_sum = 0.0

    def join(self, ready: Callable[[S | None], None], server: S | None, now: float) -> Ticket[S] | None:
        """A ticket in the line (for `server` only, or any server); None when the line is full."""
        if self.length >= self.max_size:
            self.rejections[FULL] += 1
            return None
        self.numbered += 1
        ticket = Ticket(self, ready, server, now, self.numbered)
        if server is None:
            self.anyone.append(ticket)
        else:
            self.by_server.setdefault(server, deque()).append(ticket)
        self.length += 1
        return ticket

    def next_for(self, server: S, own: bool, anyone: bool, now: float) -> Ticket[S] | None:
        """The oldest ticket `server` may serve, taken out of the line: one waiting for it (`own`:
        it is up and not disabled), or for any server (`anyone`: it takes new requests)."""
        mine = self.by_server.get(server) if own else None
        if mine is not None:
            _skip_dead(mine)
        others = self.anyone if anyone else None
        if others is not None:
            _skip_dead(others)
        if mine and (not others or mine[0].number < others[0].number):
            ticket = mine.popleft()
        elif others:
            ticket = others.popleft()
        else:
            return None
        self._served(ticket, now)
        return ticket

    def for_server(self, server: S) -> list[Ticket[S]]:
        """Every live ticket waiting for `server` alone, taken out of the line (it cannot serve them)."""
        line = self.by_server.pop(server, None)
        return self._take(line) if line is not None else []

    def everyone(self) -> list[Ticket[S]]:
        """Every live ticket, oldest first, taken out of the line."""
        taken = self._take(self.anyone)
        for line in self.by_server.values():
            taken += self._take(line)
        self.by_server.clear()
        taken.sort(key=_number)
        return taken

    def _take(self, line: deque[Ticket[S]]) -> list[Ticket[S]]:
        taken = [ticket for ticket in line if ticket.live]
        line.clear()
        for ticket in taken:
            ticket.live = False
        self.length -= len(taken)
        return taken

    def _served(self, ticket: Ticket[S], now: float) -> None:
        ticket.live = False
        self.length -= 1
        waited = now - ticket.since
        self.waits[bisect_left(WAIT_BOUNDS, waited)] += 1
        self.wait_sum += waited

    def numbers(self) -> dict[str, Any]:
        """Its figures as plain data: for metrics, and a worker's report (which the supervisor sums)."""
        return {
            "length": self.length,
            "max_size": self.max_size,
            "rejections": dict(self.rejections),
            "waits": list(self.waits),
            "wait_sum": self.wait_sum,
        }

    def summed(self, numbers: dict[str, Any]) -> None:
        """Show the workers' sums (the supervisor's queues hold no ticket of their own)."""
        self.length = numbers["length"]
        self.rejections = dict(numbers["rejections"])
        self.waits = list(numbers["waits"])
        self.wait_sum = numbers["wait_sum"]

    def carry_on(self, previous: Queue[S]) -> None:
        """Take over the line and the counters of the queue this one replaces (a reload)."""
        self.anyone, self.by_server = previous.anyone, previous.by_server
        self.length, self.numbered = previous.length, previous.numbered
        self.rejections = previous.rejections
        self.waits, self.wait_sum = previous.waits, previous.wait_sum
        for line in (self.anyone, *self.by_server.values()):
            for ticket in line:
                ticket.line = self


def _skip_dead(line: deque[Ticket[S]]) -> None:
    while line and not line[0].live:
        line.popleft()


def _number(ticket: Ticket[S]) -> int:
    return ticket.number


class RateLimiter:
    """Token buckets per client key: `rate` a second, up to `burst`, for at most `capacity` keys."""

    __slots__ = ("rate", "burst", "capacity", "buckets", "limited")

    def __init__(self, rate: float, burst: float, capacity: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        # key -> [tokens, when they were counted]; a dict keeps insertion order: a key seen again is
        # moved to the end, so the first one is the least recently seen
        self.buckets: dict[bytes, list[float]] = {}
        self.limited = 0  # requests refused

    def carry_on(self, previous: RateLimiter) -> None:
        """Keep the buckets and the count of the limiter this one replaces (a reload), within the new bound."""
        buckets = previous.buckets
        while len(buckets) > self.capacity:
            del buckets[next(iter(buckets))]
        self.buckets = buckets
        self.limited = previous.limited

    def allow(self, key: bytes, now: float) -> float:
        """0.0 if a request of `key` may go (it takes a token); else the seconds until it could."""
        buckets = self.buckets
        bucket = buckets.pop(key, None)
        if bucket is None:
            if len(buckets) >= self.capacity:
                del buckets[next(iter(buckets))]
            buckets[key] = [self.burst - 1.0, now]
            return 0.0
        buckets[key] = bucket
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        self.limited += 1
        return (1.0 - tokens) / self.rate


class TrustedProxies:
    """The proxies whose X-Forwarded-For may name the client (`trusted_proxies`)."""

    __slots__ = ("networks", "_seen")

    def __init__(self, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> None:
        self.networks = networks
        self._seen: dict[bytes, bool] = {}  # an address -> trusted; bounded (the peers are few)

    def trusts(self, address: bytes) -> bool:
        known = self._seen.get(address)
        if known is None:
            try:
                parsed = ipaddress.ip_address(address.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return False
            known = any(parsed in network for network in self.networks)
            if len(self._seen) < 4096:
                self._seen[address] = known
        return known

    def client(self, peer: bytes, forwarded: list[bytes]) -> bytes:
        """The address a request comes from: `peer`, unless it is trusted; then the rightmost
        address of the X-Forwarded-For values (`forwarded`, in order) that is not a trusted proxy.
        An entry that is not an address stops the walk: the last trusted hop is the client."""
        if not self.trusts(peer):
            return peer
        client = peer
        for field in reversed(forwarded):
            for entry in reversed(field.split(b",")):
                address = entry.strip()
                if not _is_address(address):
                    return client
                client = address
                if not self.trusts(address):
                    return client
        return client


def _is_address(text: bytes) -> bool:
    try:
        ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True
