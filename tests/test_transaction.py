"""The retry policy of a request (transaction.after_failure), without a loop or a socket.

The real-socket tests (test_http_proxy's retries and reused-connection race, test_request_lifecycle's
POST sent once) prove the same end to end; here every combination of facts is tried.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lbproxy import transaction
from lbproxy.config import Address, PoolConfig, ServerConfig
from lbproxy.pool import Pool
from lbproxy.transaction import AWAITING, GIVE_UP, OTHER_SERVER, RELAYING, SAME_SERVER, Exchange, after_failure

METHODS = [b"GET", b"HEAD", b"PUT", b"DELETE", b"POST", b"PATCH", b"CONNECT"]
SERVERS = Pool(PoolConfig("farm", tuple(ServerConfig(f"s{n}", Address("127.0.0.1", 80)) for n in range(4)))).servers


def exchange(method: bytes, answered: bool = False, replayable: bool = True, tried: int = 0) -> Exchange[object]:
    made: Exchange[object] = Exchange(method, b"/", b"", True, True)
    made.phase = RELAYING if answered else AWAITING  # some of the response reached the client, or not
    made.replayable = replayable
    made.tried = tuple(SERVERS[:tried])
    return made


@given(
    method=st.sampled_from(METHODS),
    answered=st.booleans(),
    replayable=st.booleans(),
    tried=st.integers(0, 3),
    opened=st.booleans(),
    stale=st.booleans(),
    started=st.booleans(),
    retries=st.integers(0, 3),
)
def test_a_request_that_may_have_been_acted_on_goes_again_only_if_idempotent(
    method: bytes, answered: bool, replayable: bool, tried: int, opened: bool, stale: bool, started: bool, retries: int
) -> None:
    decision = after_failure(exchange(method, answered, replayable, tried), opened, stale and opened, started, retries)
    if answered or not replayable or started:
        assert decision == GIVE_UP  # the client has part of a response, or the request is not held whole
    if decision != GIVE_UP and opened:
        assert method in transaction.IDEMPOTENT  # never a POST twice
    if decision == OTHER_SERVER:
        assert tried < retries  # the pool's retries bound the servers tried
    if decision == SAME_SERVER:
        assert stale
        assert opened


def test_the_cases_an_operator_knows() -> None:
    assert after_failure(exchange(b"POST"), False, False, False, 2) == OTHER_SERVER  # connect refused
    assert after_failure(exchange(b"POST"), True, False, False, 2) == GIVE_UP  # reset after sending
    assert after_failure(exchange(b"POST"), True, True, False, 2) == GIVE_UP  # stale: it may have been acted on
    assert after_failure(exchange(b"GET"), True, True, False, 2) == SAME_SERVER  # the keep-alive race
    assert after_failure(exchange(b"GET"), True, False, False, 2) == OTHER_SERVER
    assert after_failure(exchange(b"GET", tried=2), True, False, False, 2) == GIVE_UP
    assert after_failure(exchange(b"GET", answered=True), True, False, False, 2) == GIVE_UP
    assert after_failure(exchange(b"PUT", replayable=False), False, False, False, 2) == GIVE_UP
