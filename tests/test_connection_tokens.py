"""Fields a Connection header names: what lbproxy removes, and what it never removes (issue #13).

RFC 9110 §7.6.1 makes every field that Connection names hop-by-hop, but a client (or a server) that
names Content-Length, Transfer-Encoding, Host or the X-Forwarded-* fields that lbproxy writes must
not change how a message is framed, where it goes or what lbproxy vouches for. Each test sends the
attempt through a real lbproxy to a raw recording back-end and checks what arrived, byte for byte:
exactly one well-framed request, with its Host, and nothing after it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbproxy import framing
from tests.support import Backend, Client, Request, parse_responses, port_of, running
from tests.test_http_hardening import barrier, lb_config, read_until_close

SMUGGLED = b"GET /SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"  # 36 bytes: the body, read as a request
CHUNKED_BODY = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)

# How a client may spell a Connection header naming `name`.
SPELLINGS = {
    "as-written": lambda name: b"Connection: " + name + b"\r\n",
    "lower-case": lambda name: b"Connection: " + name.lower() + b"\r\n",
    "upper-case": lambda name: b"Connection: " + name.upper() + b"\r\n",
    "among-tokens": lambda name: b"Connection: keep-alive, X-Other,  " + name + b" ,close\r\n",
    "second-line": lambda name: b"Connection: keep-alive\r\nConnection: " + name + b"\r\n",
}

NAMES = [
    b"Content-Length",
    b"Transfer-Encoding",
    b"Host",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
]


def attempt(name: bytes, connection: bytes) -> bytes:
    """A POST whose body is a whole request, framed by Transfer-Encoding when that is the named field."""
    if name == b"Transfer-Encoding":
        framing, body = b"Transfer-Encoding: chunked\r\n", CHUNKED_BODY
    else:
        framing, body = b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED
    return (
        b"POST /a HTTP/1.1\r\nHost: app.example\r\n"
        + connection
        + framing
        + b"X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: gopher\r\nX-Forwarded-Host: evil.example\r\n\r\n"
        + body
    )


def assert_one_well_framed_request(backend: Backend, count: int) -> Request:
    """`count` requests reached `backend` (one is the attempt, the others barriers), each framed whole."""
    seen = b"".join(bytes(raw) for raw in backend.raw)
    assert seen == b"".join(request.raw for request in backend.requests), f"unframed bytes reached the server: {seen!r}"
    targets = [request.target for request in backend.requests]
    assert b"/SMUGGLED" not in targets, f"the body was read as a request: {seen!r}"
    assert len(backend.requests) == count, targets
    (request,) = [request for request in backend.requests if request.target == b"/a"]
    assert request.header_lines(b"Host") == [b"app.example"], request.raw
    assert request.body == SMUGGLED, request.raw
    lines = request.raw.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert sum(line.startswith((b"content-length:", b"transfer-encoding:")) for line in lines) == 1, request.raw
    return request


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS.keys())
@pytest.mark.parametrize("name", NAMES, ids=[name.decode() for name in NAMES])
async def test_connection_cannot_remove_a_framing_routing_or_forwarded_field(
    tmp_path: Path, name: bytes, spelling: object
) -> None:
    connection = spelling(name)  # type: ignore[operator]
    async with Backend("a") as backend, running(lb_config(backend.address), tmp_path) as lb:
        port = port_of(lb)
        async with await Client.connect(port) as client:
            await client.send(attempt(name, connection))
            response = await client.response()
            assert response.status == 200
        await barrier(port, backend, 0)  # anything written upstream for the attempt has arrived by now
        request = assert_one_well_framed_request(backend, 2)
    # lbproxy's own forwarded fields, whatever the client named: its address appended, its proto and host
    assert request.header_lines(b"X-Forwarded-For") == [b"192.0.2.1, 127.0.0.1"]
    assert request.header_lines(b"X-Forwarded-Proto") == [b"http"]
    assert request.header_lines(b"X-Forwarded-Host") == [b"app.example"]
    assert request.header(b"Connection") is None


async def test_connection_still_removes_the_fields_it_may_name(tmp_path: Path) -> None:
    """The protection is for those fields only: X-Secret, named with them, is still hop-by-hop."""
    connection = b"Connection: Content-Length, X-Secret, Host\r\nX-Secret: s3cret\r\nX-Kept: yes\r\n"
    async with Backend("a") as backend, running(lb_config(backend.address), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(attempt(b"Content-Length", connection))
            assert (await client.response()).status == 200
        await barrier(port_of(lb), backend, 0)
        request = assert_one_well_framed_request(backend, 2)
    assert request.header(b"X-Secret") is None
    assert request.header(b"X-Kept") == b"yes"


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: 5\r\n", b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["content-length", "chunked"],
)
@pytest.mark.parametrize(
    "connection",
    [b"Connection: Content-Length\r\n", b"Connection: Transfer-Encoding, Content-Length\r\n"],
    ids=["content-length", "both"],
)
async def test_server_naming_its_framing_in_connection_does_not_change_the_relayed_framing(
    tmp_path: Path, framing: bytes, body: bytes, connection: bytes
) -> None:
    """A response keeps the field that frames it, so the client reads exactly its body, then the next."""
    answered = 0

    def respond(request: Request, transport: object) -> None:
        nonlocal answered
        answered += 1
        if answered == 1:
            transport.write(b"HTTP/1.1 200 OK\r\n" + connection + framing + b"\r\n" + body)  # type: ignore[attr-defined]
        else:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")  # type: ignore[attr-defined]

    async with (
        Backend("a", respond) as backend,
        running(lb_config(backend.address), tmp_path) as lb,
        await Client.connect(port_of(lb)) as client,
    ):
        await client.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        first = await client.response()
        await client.send(b"GET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        rest = parse_responses(await read_until_close(client, 3.0))
    assert first.status == 200
    assert first.body == b"hello"
    assert first.header(b"Content-Length") == b"5" or first.header(b"Transfer-Encoding") == b"chunked"
    assert [(response.status, response.body) for response in rest] == [(200, b"second")]


@pytest.mark.parametrize(
    ("value", "keeps_open"),
    [(b"close", False), (b"Close", False), (b"keep-alive", True), (b"Keep-Alive", True), (b"Upgrade", True)],
)
async def test_usual_connection_values_frame_one_request_and_decide_the_connection(
    tmp_path: Path, value: bytes, keeps_open: bool
) -> None:
    """`close`, `keep-alive` and `upgrade` as most clients write them skip the split (issue #19): the
    server still gets exactly one well-framed request, without the client's Connection field."""
    async with Backend("a") as backend, running(lb_config(backend.address), tmp_path) as lb:
        port = port_of(lb)
        async with await Client.connect(port) as client:
            await client.send(attempt(b"Content-Length", b"Connection: " + value + b"\r\n"))
            assert (await client.response()).status == 200
            if keeps_open:
                await client.send(b"GET /next HTTP/1.1\r\nHost: app.example\r\n\r\n")
                assert (await client.response()).status == 200
            else:
                assert await client.reader.read() == b""  # lbproxy closed the connection
        await barrier(port, backend, 0)
        request = assert_one_well_framed_request(backend, 3 if keeps_open else 2)
    assert request.header(b"Connection") is None


@given(
    st.lists(
        st.one_of(
            st.sampled_from([b"close", b"Close", b"keep-alive", b"Keep-Alive", b"upgrade", b"Upgrade", b"CLOSE"]),
            st.binary(max_size=24).map(lambda value: bytes(b for b in value if 32 <= b < 127)),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_connection_tokens_as_written_by_most_read_as_any_other(values: list[bytes]) -> None:
    """The usual values (`close`, `keep-alive`, `upgrade`) skip the split (issue #19): same tokens."""
    general = {token.strip().lower() for value in values for token in value.split(b",")} - {b""}
    assert framing.connection_tokens(values) == general
