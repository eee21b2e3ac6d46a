"""Which server gets a request, or a connection: one call for both proxies, no I/O.

`select` is the step between a request's head and the server it goes to. Today it asks the pool
(the failover order and the policy, `Pool.pick`), or, for a retry, for a server not yet tried
(`Pool.pick_other`). It is the one place where what the next issues add will plug in, in this order:
the route that names the pool (#15), persistence that may name the server (#15), per-server limits
and the queue that may say "wait" (#17); the protocols do not change when they come. The TCP proxy
calls it with no head. `retry_elsewhere` is the one rule for trying another server after a failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbproxy.pool import Pool, Server
    from lbproxy.request_head import RequestHead


def select(pool: Pool, request: RequestHead | None, tried: tuple[Server, ...]) -> Server | None:
    """The server for `request` (None in tcp mode) from `pool`, never one of `tried`; None if there is none."""
    return pool.pick_other(tried) if tried else pool.pick()


def retry_elsewhere(tried: int, retries: int, reached: bool, idempotent: bool) -> bool:
    """After a failed server, may the request (or connection) go to another? Within the pool's
    `retries`, when provably nothing reached the failed one (its connection never opened), or when
    sending it twice is harmless. The L4 proxy asks only for connections that never opened."""
    return tried < retries and (not reached or idempotent)
