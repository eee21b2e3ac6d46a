"""One request's life in the L7 proxy: its phase, and what a failure of its server leads to; no I/O.

An `Exchange` is a request as the reader built it (a `RequestHead`) plus the state of serving it,
and it is always in exactly one phase:

    RECEIVED ──> QUEUED ──> CONNECTING ──> SENDING ──> AWAITING ──> RELAYING ──> DONE
     (its head    (every      (no idle      (body still   (the whole    (response     (or refused:
      is read;     server it   connection:   arriving)     request is    bytes reach   an error of
      pipelined    may go to   opening one)                with the      the client)   lbproxy's own)
      ones wait    is at its                               server)           └──> TUNNEL (after a 101)
      here)        limit: the
                   pool's queue)

A request with no body skips SENDING; one that reuses an idle connection skips CONNECTING; one whose
server has room skips QUEUED (a pool without max_connections has no queue). A failed
server connection sends it back to CONNECTING (a retry) or ends it (`after_failure`). The client
connection's deadlines follow the active exchange's phase (docs/architecture.md, "Timers").

What the phase implies is not stored again: "some of the response reached the client" is
`phase >= RELAYING`, "the request is being written to a server" is `upstream is not None`. Two facts
of the request's body run beside the phase, because a body may still arrive while the response is
relayed (a server may answer early): `request_done` (the client sent all of it) and `replayable`
(every byte of it so far is still held, so the request can go again).

`after_failure` is the one retry policy: the stale-connection rule, idempotency and the replay
buffer, decided from facts the protocols pass in. The protocols act on its answer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from lbproxy.request_head import RequestHead
from lbproxy.selection import retry_elsewhere

if TYPE_CHECKING:
    from lbproxy.pool import Server

# Phases: ints, set on the hot path (docs/architecture.md, "The phases of a request", names them).
RECEIVED: Final = 0
QUEUED: Final = 1
CONNECTING: Final = 2
SENDING: Final = 3
AWAITING: Final = 4
RELAYING: Final = 5
TUNNEL: Final = 6
DONE: Final = 7

# RFC 9110 §9.2.2: methods whose repetition has the effect of one request.
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
REPLAY_LIMIT: Final = 64 * 1024  # request bodies up to this size are kept until a response begins

# What after_failure decides.
GIVE_UP: Final = 0  # 502 or 504 to the client (or a cut, if part of the response reached it)
SAME_SERVER: Final = 1  # again, on a new connection to the same server, uncounted
OTHER_SERVER: Final = 2  # a retry on a server not yet tried, counted


U = TypeVar("U")  # the protocol of the server connection (http_proxy.UpstreamConnection)


class Exchange(RequestHead, Generic[U]):
    """One request and its response, from the client's head to the server's last byte.

    It is the request head as the reader built it (`RequestHead`: what the client asked) and the
    state of serving it; one object per request.
    """

    __slots__ = (
        "phase",
        "body_size",
        "held",
        "replayable",
        "request_done",
        "server",
        "tried",
        "upstream",
        "status",
        "timed_out",
        "response_bytes",
        "started",
    )

    def __init__(self, method: bytes, target: bytes, forward: bytes, client_11: bool, keep_alive: bool) -> None:
        # RequestHead's fields, set here rather than through super(): this runs once per request
        self.method = method
        self.target = target
        self.forward = forward
        self.client_11 = client_11
        self.keep_alive = keep_alive
        self.chunked = False
        self.upgrade = False
        self.has_body = False
        self.pin = False
        self.pool = None
        self.key = None
        self.cookie = None
        # `client` is left unset: only a listener with trusted_proxies sets it (see _access_log)
        self.phase = RECEIVED
        self.body_size = 0
        self.held: list[bytes] = []  # body parts not yet sent, or kept to replay the request
        self.replayable = True  # every byte of the request so far is still held
        self.request_done = False
        self.server: Server | None = None
        self.tried: tuple[Server, ...] = ()  # servers that failed it, for a retry elsewhere (rare)
        self.upstream: U | None = None  # the server connection serving it now
        self.status = 0
        self.timed_out = False  # the last server failed by staying silent
        self.response_bytes = 0
        self.started = time.monotonic()


def after_failure(
    exchange: Exchange[Any], connection_opened: bool, stale: bool, response_started: bool, retries: int
) -> int:
    """What to do with `exchange` once its server connection failed before the response was whole.

    `connection_opened`: a connection to the server existed (some of the request may have reached
    it). `stale`: it was a reused keep-alive connection that closed with no response byte, the race
    every proxy has. `retries`: how many servers the pool lets a request try after the first.
    """
    if exchange.phase >= RELAYING or not exchange.replayable or response_started:
        return GIVE_UP  # part of the response is out, or the request is no longer held whole
    idempotent = exchange.method in IDEMPOTENT
    if stale and idempotent:
        # Nothing came back: the request goes again on a new connection to the same server. Only an
        # idempotent one: the server may have acted on it (a non-idempotent request is never sent
        # on a reused connection, but a pinned one is reused).
        return SAME_SERVER
    # Another server, when provably nothing reached this one (the connection never opened), or
    # when sending it twice is harmless.
    if retry_elsewhere(len(exchange.tried), retries, connection_opened, idempotent):
        return OTHER_SERVER
    return GIVE_UP
