"""framing.ResponseHead against a plain reading of RFC 9110 §7.6.1 and RFC 9112 §6, line by line.

ResponseHead reads a server's head without lower-casing it or matching a regular expression over it
(issue #19): these tests hold it to what the straightforward version says, for every case and
spacing of the field names it acts on.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbproxy.framing import HOP_BY_HOP, NOT_NAMEABLE, ResponseHead

ACTED_ON = sorted(HOP_BY_HOP | {b"content-length", b"www-authenticate"})
OTHERS = [b"server", b"date", b"content-type", b"cache-control", b"x-trace", b"te-extra", b"connections", b"etag"]


def reference(head: bytes, upgrade: bool) -> tuple[bytes, int | None, bool, bytes, bool]:
    """What ResponseHead must make of `head`: (head, content_length, chunked, codings, pin)."""
    status, *fields = head.split(b"\r\n")[:-1]
    kept: list[bytes] = []
    content_length = None
    codings: list[bytes] = []
    named: set[bytes] = set()
    pin = False
    for line in fields:
        raw_name, _, raw_value = line.partition(b":")
        name, value = raw_name.lower(), raw_value.strip(b" \t")
        if name == b"content-length":
            content_length = int(value)
        elif name == b"www-authenticate":
            pin = pin or value.lower().startswith((b"ntlm", b"negotiate"))
        elif name == b"upgrade" and upgrade:
            pass
        elif name in HOP_BY_HOP:
            if name == b"connection":
                named |= {token.strip().lower() for token in value.split(b",") if token.strip()} - NOT_NAMEABLE
            elif name == b"transfer-encoding":
                codings += [coding.strip(b" \t").lower() for coding in value.split(b",") if coding.strip(b" \t")]
            continue
        kept.append(line)
    kept = [line for line in kept if line.partition(b":")[0].lower() not in named]
    chunked = codings[-1:] == [b"chunked"]
    out = b"\r\n".join([status, *kept, b""])
    if not out.startswith(b"HTTP/1.1 "):
        out = b"HTTP/1.1" + out[8:]
    return out, content_length, chunked, b", ".join(codings[:-1]) if chunked else b"", pin


def made(head: bytes, upgrade: bool = False) -> tuple[bytes, int | None, bool, bytes, bool]:
    got = ResponseHead(head, upgrade)
    return got.head, got.content_length, got.chunked, got.codings, got.pin


def any_case(name: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda upper: bytes(
            byte - 32 if flip and 97 <= byte <= 122 else byte for byte, flip in zip(name, upper, strict=True)
        )
    )


SPACE = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t"])
TOKEN = st.sampled_from([b"close", b"keep-alive", b"Keep-Alive", b"x-trace", b"X-Trace", b"server", b"upgrade"])
CODING = st.sampled_from([b"chunked", b"gzip", b"Chunked", b"br", b"deflate"])
VALUE = st.binary(max_size=20).map(lambda value: bytes(b for b in value if 32 <= b < 127))


@st.composite
def field(draw: st.DrawFn) -> bytes:
    name = draw(any_case(draw(st.sampled_from(ACTED_ON + OTHERS))))
    lower = name.lower()
    if lower == b"connection":
        value = b", ".join(draw(st.lists(TOKEN, min_size=1, max_size=3)))
    elif lower == b"transfer-encoding":
        value = b", ".join(draw(st.lists(CODING, min_size=1, max_size=3)))
    elif lower == b"www-authenticate":
        value = draw(st.sampled_from([b"NTLM", b"Negotiate abc", b"Basic realm=x", b"ntlm"]))
    else:
        value = draw(VALUE).strip(b" \t")
    return name + b":" + draw(SPACE) + value + draw(SPACE)


@st.composite
def response_head(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 101 Switching Protocols"]))
    fields = draw(st.lists(field(), max_size=12))
    fields = [line for line in fields if line.lower().partition(b":")[0] != b"content-length"]
    if draw(st.booleans()):  # llhttp lets one Content-Length through: digits, maybe within whitespace
        length = draw(st.integers(min_value=0, max_value=10**12))
        fields.insert(
            draw(st.integers(0, len(fields))),
            draw(any_case(b"content-length")) + b":%b%d%b" % (draw(SPACE), length, draw(SPACE)),
        )
    return b"\r\n".join([status, *fields, b""])


@given(response_head(), st.booleans())
def test_response_head_is_read_as_the_rfcs_say(head: bytes, upgrade: bool) -> None:
    assert made(head, upgrade) == reference(head, upgrade)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nCONNECTION: close\r\nContent-Length: 3\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"),
        (b"HTTP/1.0 200 OK\r\nconnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n", b"HTTP/1.1 200 OK\r\n"),
        (  # the fields that Connection names go too, whatever their case; Content-Length never does
            b"HTTP/1.1 200 OK\r\nX-Trace: 1\r\nConnection: x-trace, content-length\r\n"
            b"x-TRACE: 2\r\nContent-Length: 0\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",
        ),
        (  # adjacent lines cut together, and the last line too
            b"HTTP/1.1 200 OK\r\nTE: trailers\r\nTrailer: x\r\nServer: s\r\nProxy-Connection: close\r\n",
            b"HTTP/1.1 200 OK\r\nServer: s\r\n",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Type: t\r\nConnectionX: 1\r\nContent-Typo: 2\r\n", None),  # near misses stay
    ],
)
def test_response_heads_cut_as_expected(head: bytes, expected: bytes | None) -> None:
    assert ResponseHead(head, False).head == (head if expected is None else expected)


def test_content_length_and_codings_are_read_whatever_the_case() -> None:
    head = ResponseHead(b"HTTP/1.1 200 OK\r\ncontent-LENGTH: \t1234 \r\n", False)
    assert head.content_length == 1234
    chunked = ResponseHead(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: GZIP\r\ntransfer-encoding: Chunked\r\n", False)
    assert (chunked.chunked, chunked.codings, chunked.head) == (True, b"gzip", b"HTTP/1.1 200 OK\r\n")
    assert ResponseHead(b"HTTP/1.1 401 No\r\nWWW-Authenticate: NTLM\r\n", False).pin


@pytest.mark.parametrize("value", [b"1 2", b"", b" ", b"12a", b"-1"])
def test_a_content_length_llhttp_would_not_let_through_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError, match="Content-Length not understood"):
        ResponseHead(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n", False)
