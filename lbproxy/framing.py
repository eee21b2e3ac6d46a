"""HTTP/1.1 message rules that need no I/O: which headers are hop-by-hop, how a message body is
framed (RFC 9112 §6), what a request must look like to be forwarded, and the byte constants that the
protocols write.

httptools (llhttp in strict mode) already rejects most malformed input: Content-Length with
Transfer-Encoding, duplicate or malformed Content-Length, bad chunk sizes, obs-fold, bare CR or LF,
control characters and whitespace before a colon. `check_request` adds what llhttp leaves to the
application: the Host rules, the only Transfer-Encoding we accept, the version, CONNECT and
absolute-form targets. This module must stay free of sockets and of the event loop.
"""

from __future__ import annotations

import re
from typing import Final

# RFC 9110 §7.6.1: removed by every proxy; Transfer-Encoding is re-framed, Upgrade kept only on an upgrade.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",  # belongs to the h2c upgrade, which is never tunnelled
    }
)
CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})  # not header names
FORWARDED: Final = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# What lbproxy says of a TLS client's certificate (mutual TLS): a client's own never goes on.
CLIENT_CERT: Final = frozenset({b"x-client-cert-subject", b"x-client-cert-verify"})
# RFC 9110 §7.6.1 lets a sender name more hop-by-hop fields in Connection, but these are end-to-end by
# meaning, and a message without them is framed, routed or vouched for differently: a request whose
# Connection names Content-Length would reach the server with its body read as the next request. A
# Connection token naming one of them is ignored (as HAProxy ignores every token but close,
# keep-alive and upgrade); the field is kept, or rewritten by lbproxy as it would be anyway.
END_TO_END: Final = frozenset({b"host", b"content-length", b"transfer-encoding"}) | FORWARDED
NOT_NAMEABLE: Final = CONNECTION_OPTIONS | END_TO_END  # Connection tokens that never remove a field

# Space, controls, '"', '#', '/', '<', '>', '?', '@', '\\', '^', '`', '{', '|', '}' and DEL never belong in a Host.
_NOT_IN_HOST: Final = bytes(range(0x21)) + b'"#/<>?@\\^`{|}\x7f'

# Body framing of a response, decided at its head (RFC 9112 §6.3).
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3


class BadRequest(Exception):
    """A request that must not be forwarded; `status` is what the client gets."""

    def __init__(self, status: int, reason: str, extra: bytes = b"") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.extra = extra  # header lines of the answer (a redirect's Location), each ending CRLF


# Connection values as nearly every client and server writes them, with their tokens: no split needed
_USUAL_CONNECTION: Final = {
    value: frozenset({value.lower()})
    for value in (b"close", b"Close", b"keep-alive", b"Keep-Alive", b"upgrade", b"Upgrade")
}


def connection_tokens(values: list[bytes]) -> frozenset[bytes] | set[bytes]:
    """The lower-cased tokens of every Connection header value."""
    if len(values) == 1:
        usual = _USUAL_CONNECTION.get(values[0])
        if usual is not None:
            return usual
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


# The response fields lbproxy acts on: the hop-by-hop ones, which it cuts, and two it reads. A line is
# looked at closer only when its first byte (either case) starts one of these names and a colon stands
# where that name would end, so most lines cost a byte lookup and none is lower-cased unless it is
# one of them. (Issue #19: a regular expression over the lower-cased head, as before, cost a third of
# the compiled build's instructions per request.)
_RESPONSE_NAMES: Final = frozenset(HOP_BY_HOP | {b"content-length", b"www-authenticate"})
# ... each with its name as most servers write it, compared first (a `bytes.lower()` costs a call)
_USUAL: Final = {b"te": b"TE:", b"http2-settings": b"HTTP2-Settings:", b"www-authenticate": b"WWW-Authenticate:"}
_BY_FIRST_BYTE: Final[list[tuple[tuple[bytes, bytes], ...]]] = [
    tuple(
        (name, _USUAL.get(name, b"-".join(part.capitalize() for part in name.split(b"-")) + b":"))
        for name in sorted(_RESPONSE_NAMES)
        if name[0] == byte | 0x20
    )
    for byte in range(256)
]
_FIRST_BYTES: Final = bytes(1 if names else 0 for names in _BY_FIRST_BYTE)  # 1 where a name may start


def _response_field(line: bytes) -> bytes:
    """The lower-case name of the field on `line` if it is one lbproxy acts on, else b""."""
    for name, usual in _BY_FIRST_BYTE[line[0]]:
        if line.startswith(usual):
            return name
        length = len(name)
        if len(line) > length and line[length] == 58 and line[:length].lower() == name:  # 58: ':'
            return name
    return b""


def _content_length(line: bytes) -> int:
    """The value of a `Content-Length:` line, which llhttp let through as digits in optional whitespace."""
    value = 0
    digits = 0
    after = False  # whitespace after the digits: only whitespace may follow
    for index in range(15, len(line)):
        byte = line[index]
        if 48 <= byte <= 57 and not after:
            value = value * 10 + byte - 48
            digits += 1
        elif byte == 32 or byte == 9:
            after = digits > 0
        else:
            raise ValueError("Content-Length not understood")
    if not digits:
        raise ValueError("Content-Length not understood")
    return value


def cut_field(head: bytes, lower: bytes, name: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """Remove every `name:` line (`name` lower-case) from a head whose lines all end in CRLF.

    `lower` is `head.lower()`, kept in step; returns the new head, its lower twin and the values cut.
    """
    key = b"\r\n" + name + b":"
    values: list[bytes] = []
    start = lower.find(key)
    while start >= 0:
        end = lower.find(b"\r\n", start + 2)
        values.append(head[start + len(key) : end].strip(b" \t"))
        head = head[:start] + head[end:]
        lower = lower[:start] + lower[end:]
        start = lower.find(key, start)
    return head, lower, values


class ResponseHead:
    """A server's response head as lbproxy relays it: hop-by-hop fields cut, facts noted.

    Whether the server keeps the connection open is llhttp's to say (`should_keep_alive()`): it has
    read the version and every Connection field already.
    """

    __slots__ = ("head", "content_length", "chunked", "codings", "pin")

    def __init__(self, head: bytes, upgrade: bool) -> None:
        """`head` runs from the status line to the CRLF of the last field (no blank line)."""
        content_length: int | None = None
        chunked = False
        codings: list[bytes] | None = None  # every transfer coding, in order (RFC 9112 §6.1)
        pin = False
        # strict llhttp has checked the head: every line ends in CRLF, none is folded or empty
        lines = head.split(b"\r\n")  # the status line, the fields, and b"" after the last CRLF
        cuts: list[int] | None = None  # where the lines cut start and end in `head`, in pairs
        named: frozenset[bytes] | set[bytes] | None = None  # the fields that Connection names
        at = len(lines[0])  # where the CRLF before the line in hand stands in `head`
        for index in range(1, len(lines) - 1):
            line = lines[index]
            start = at
            at += 2 + len(line)
            if not _FIRST_BYTES[line[0]]:
                continue
            name = _response_field(line)
            if not name:
                continue
            if name == b"content-length":
                content_length = _content_length(line)
                continue
            if name == b"www-authenticate":
                # NTLM and Negotiate authenticate the connection, not the request (RFC 4559).
                pin = pin or line[17:].strip(b" \t").lower().startswith((b"ntlm", b"negotiate"))
                continue
            if name == b"upgrade" and upgrade:
                continue  # a 101's Upgrade names the protocol switched to
            if cuts is None:
                cuts = [start, at]
            else:
                cuts += (start, at)
            if name == b"connection":
                if line != b"Connection: keep-alive" and line != b"Connection: close":
                    tokens = connection_tokens([line[11:]]) - NOT_NAMEABLE
                    named = tokens if named is None else named | tokens
            elif name == b"transfer-encoding":
                # the last coding decides (RFC 9112 §6.3); llhttp checked the rest
                if codings is None:
                    codings = []
                codings += filter(None, (coding.strip(b" \t") for coding in line[18:].lower().split(b",")))
                chunked = codings[-1:] == [b"chunked"]
        if cuts is not None:
            if len(cuts) == 2:  # the usual: one `Connection: keep-alive`
                head = head[: cuts[0]] + head[cuts[1] :]
            else:
                ends = [0, *cuts, len(head)]  # the pieces kept run from each cut's end to the next's start
                head = b"".join([head[ends[index] : ends[index + 1]] for index in range(0, len(ends), 2)])
        if named:  # RFC 9110 §7.6.1: the fields that Connection names are hop-by-hop too
            lower = head.lower()
            for field in named:
                head, lower, _ = cut_field(head, lower, field)
        if not head.startswith(b"HTTP/1.1 "):
            head = b"HTTP/1.1" + head[8:]  # we speak HTTP/1.1 to the client whatever the server spoke
        self.head = head
        self.content_length = content_length
        self.chunked = chunked
        # codings applied before chunked (gzip...) are rare, and kept: lbproxy re-chunks, never decodes
        self.codings = b", ".join(codings[:-1]) if chunked and codings else b""
        self.pin = pin


def response_framing(request_method: bytes, status: int, content_length: int | None, chunked: bool) -> int:
    """How the body of a response is delimited (RFC 9112 §6.3, in its order of precedence)."""
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    if chunked:
        return CHUNKED
    if content_length is not None:
        return LENGTH
    return UNTIL_CLOSE


def check_request(
    method: bytes,
    version: str,
    target: bytes,
    host: bytes | None,
    host_count: int,
    transfer_encoding: bytes | None,
    transfer_encoding_count: int,
    max_target: int,
) -> None:
    """Raise BadRequest for a request that lbproxy refuses to forward; llhttp has checked the rest.

    `host` and `transfer_encoding` are the last values seen, the counts how many header lines there were.
    The characters of the Host value are `check_host`'s to judge.
    """
    if version not in ("1.1", "1.0"):
        # llhttp reads a request line without a version (HTTP/0.9's `GET /x`) as version 0.9 too:
        # the caller, which has the bytes, tells the two apart with `versionless` and answers 400.
        raise BadRequest(505, "HTTP version not supported")
    if len(target) > max_target:
        raise BadRequest(414, "request-target too long")
    if method == b"CONNECT":
        raise BadRequest(405, "CONNECT is not served: this is a reverse proxy")
    if version == "1.1" and host_count == 0:
        raise BadRequest(400, "missing Host header")  # RFC 9112 §3.2
    if host_count > 1:
        raise BadRequest(400, "more than one Host header")
    if transfer_encoding is not None:
        # RFC 9112 §6.1: chunked must be the final coding. We accept it only alone, since we
        # re-frame the body and would otherwise have to pass on codings we cannot see into.
        if version == "1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")  # RFC 9112 §6.1
        if transfer_encoding_count != 1 or transfer_encoding.lower() != b"chunked":
            raise BadRequest(400, "unsupported Transfer-Encoding")
    if target[:1] != b"/":
        if target == b"*":
            if method != b"OPTIONS":
                raise BadRequest(400, "asterisk-form target outside OPTIONS")
            return
        authority = absolute_form_authority(target)
        if authority is None:
            raise BadRequest(400, "malformed request-target")
        if host is None or authority.lower() != host.lower():
            raise BadRequest(400, "absolute-form target names another host")


# A whole line `METHOD SP target` and its end: a request line with no version, HTTP/0.9's form.
_VERSIONLESS: Final = re.compile(rb"(?:^|\n)[A-Z-]+ [^ \r\n]+\r?\n")


def versionless(data: bytes) -> bool:
    """Whether `data` holds a request line without an HTTP version (`GET /x` CRLF).

    llhttp takes such a line for HTTP/0.9 and waits for header lines after it; lbproxy answers 400
    at once instead (HTTP/0.9 has no headers, so its client waits in silence otherwise).
    """
    return _VERSIONLESS.search(data) is not None


def last_line(data: bytes) -> bytes:
    """The last complete line of `data`, with its line end; empty when there is none."""
    end = data.rfind(b"\n")
    return data[data.rfind(b"\n", 0, end) + 1 : end + 1] if end >= 0 else b""


def check_host(host: bytes) -> None:
    """RFC 9110 §7.2: uri-host [":" port]; refuses what could confuse a server's virtual hosting.

    An empty Host is allowed (for targets with no authority).
    """
    if len(host.translate(None, _NOT_IN_HOST)) != len(host):
        raise BadRequest(400, "invalid Host header")


def absolute_form_authority(target: bytes) -> bytes | None:
    """The authority of an absolute-form target (`http://host:port/path`), or None."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        position = rest.find(delimiter)
        if 0 <= position < end:
            end = position
    authority = rest[:end]
    return authority if authority and b"@" not in authority else None


def status_class(status: int) -> int:
    """1 to 5 for 1xx to 5xx: the `code` label of the response counters, as HAProxy counts them."""
    return min(max(status // 100, 1), 5)


_REASONS: Final = {
    308: b"Permanent Redirect",
    400: b"Bad Request",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def error_response(status: int, body: bytes | None = None, extra: bytes = b"", close: bool = True) -> bytes:
    """A complete response that lbproxy itself sends; `extra` is more header lines, each ending CRLF."""
    reason = _REASONS.get(status, b"Error")
    if body is None:
        body = b"%d %s\n" % (status, reason)
        content_type = b"text/plain; charset=utf-8"
    else:
        content_type = b"text/html; charset=utf-8"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Content-Type: ",
            content_type,
            b"\r\nContent-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\n",
            extra,
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            body,
        )
    )
