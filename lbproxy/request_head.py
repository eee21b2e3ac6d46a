"""Request heads, from httptools' callbacks to the head that goes to the server; no I/O.

`RequestReader` is what a client connection's llhttp parser calls back while a head arrives. It
gathers the fields as received, notes the few that lbproxy acts on, enforces the head's limits
(field count and size, trailers included, the body-on-upgrade rule), checks the request
(`framing.check_request`, `framing.check_host`) and rebuilds it as lbproxy forwards it: the request
line with the target byte for byte, the end-to-end fields in their order and case, less the
hop-by-hop ones and those `Connection` names (never `framing.END_TO_END`), plus X-Forwarded-*. The
result, a `RequestHead`, goes to the reader's owner (the client protocol), which alone decides what
happens to the request. A refusal is a `framing.BadRequest` raised from a callback.

The body callbacks are the owner's own methods, handed to the parser through the reader's
attributes, so that a body costs no call here. This module knows the listener's settings; it never
sees a socket, a server or the event loop.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import httptools
from mypy_extensions import trait

from lbproxy import framing
from lbproxy.framing import BadRequest

if TYPE_CHECKING:
    from collections.abc import Callable

    from lbproxy.limits import TrustedProxies
    from lbproxy.pool import Pool

    # selection.Steering.steer: (method, target, Host, fields, client address) -> (pool, persistence key)
    Steer = Callable[[bytes, bytes, bytes | None, list[bytes], bytes], tuple[Pool, bytes | None]]

# Header names looked at are recognised by length first: most headers are then skipped without
# lower-casing them (Content-Type 12, Accept 6, User-Agent 10 but also Connection 10...).
_NAMES: Final = (
    framing.HOP_BY_HOP | framing.FORWARDED | framing.CLIENT_CERT | {b"host", b"content-length", b"authorization"}
)
_LENGTHS: Final = frozenset(len(name) for name in _NAMES)
_CRLF: Final = b"\r\n"


@trait
class Settings:
    """What a reader needs of its listener: read at each head, so a reload applies to the next one.

    A trait (mypy_extensions), not a typing.Protocol: `HttpListener` inherits it, so that the compiled
    reader reaches these attributes at their place rather than by name (issue #19). Interpreted, it is
    a plain base class; mypy checks that an implementer leaves no abstract method out."""

    __slots__ = ()

    forwarded: bool
    proto_field: bytes
    max_header_size: int
    max_header_count: int
    max_target: int
    max_body: int | None
    steer: Steer | None  # routes, persistence, a rate limit (selection.Steering), else None: nothing to read
    trusted: TrustedProxies | None  # trusted_proxies: whose X-Forwarded-For names the client

    @abstractmethod
    def default_host(self) -> bytes:
        raise NotImplementedError


class RequestHead:
    """One request as lbproxy forwards it: `forward` is the whole head for the server."""

    __slots__ = (
        "method",
        "target",
        "forward",
        "client_11",
        "keep_alive",
        "chunked",
        "upgrade",
        "has_body",
        "pin",
        "pool",
        "key",
        "cookie",
        "client",
    )

    def __init__(self, method: bytes, target: bytes, forward: bytes, client_11: bool, keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.forward = forward
        self.client_11 = client_11
        self.keep_alive = keep_alive
        self.chunked = False  # the body is chunked (and goes on re-chunked)
        self.upgrade = False  # asks to switch protocols (WebSocket): the Upgrade field goes on
        self.has_body = False
        self.pin = False  # NTLM or Negotiate credentials: they authenticate the connection
        self.pool: Pool | None = None  # the route's pool, or the pool of a listener that steers; None: the listener's
        self.key: bytes | None = None  # the persistence key (selection)
        self.cookie: tuple[bytes, bytes] | None = None  # the Set-Cookie line for the response, plain and Secure
        self.client: bytes | None = None  # the client a trusted proxy named (trusted_proxies); None: the peer


H = TypeVar("H", bound=RequestHead)


class RequestReader(Generic[H]):
    """Turns one client connection's llhttp callbacks into `RequestHead`s for `on_request`.

    The heads are made by `make`: `RequestHead` itself, or a subclass that carries the owner's
    per-request state too (the proxy's `Exchange`), so that a request costs one object.
    """

    __slots__ = (
        "settings",
        "make",
        "parser",
        "on_request",
        "on_body",
        "on_message_complete",
        "on_chunk_header",
        "client_ip",
        "forwarded_for",
        "url",
        "fields",
        "field_count",
        "field_bytes",
        "unusual",
        "host",
        "hosts",
        "checked_host",
        "te",
        "tes",
        "connection",
        "upgrade",
        "xff",
        "content_length",
        "auth_pin",
        "in_body",
        "client_cert",
    )

    def __init__(
        self,
        settings: Settings,
        make: Callable[[bytes, bytes, bytes, bool, bool], H],
        on_request: Callable[[H], None],
        on_body: Callable[[bytes], None],
        on_message_complete: Callable[[], None],
        on_chunk_header: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.make = make
        self.on_request = on_request
        # the owner's body callbacks, which llhttp finds here and calls directly
        self.on_body = on_body
        self.on_message_complete = on_message_complete
        self.on_chunk_header = on_chunk_header
        self.client_ip = b"unknown"
        self.forwarded_for = b"X-Forwarded-For: unknown\r\n"  # the field for a request that has none
        self.url = b""
        self.fields: list[bytes] = []  # the head to forward, flat: name, b": ", value, CRLF, name, ...
        self.field_count = 0
        self.field_bytes = 0
        self.unusual = False  # a field below other than Host and Content-Length was seen
        self.host: bytes | None = None
        self.hosts = 0
        self.checked_host = b""  # the last Host value found valid
        self.te: bytes | None = None
        self.tes = 0
        self.connection: list[bytes] | None = None
        self.upgrade: bytes | None = None
        self.xff: list[bytes] | None = None
        self.content_length: bytes | None = None
        self.auth_pin = False
        self.in_body = False  # a body is being read: header callbacks are its trailer fields
        self.client_cert = b""  # mutual TLS: the X-Client-Cert-* lines of this connection's certificate
        # llhttp, strict (no lenient flags): it calls this reader back, and the owner's body callbacks
        self.parser = httptools.HttpRequestParser(self)

    def client_is(self, address: bytes) -> None:
        """The client's address, for X-Forwarded-For (from the socket, or a PROXY header)."""
        self.client_ip = address
        self.forwarded_for = b"X-Forwarded-For: " + address + _CRLF

    def body_ended(self) -> None:
        """The owner's on_message_complete ended a body: the next fields are a head's again."""
        self.in_body = False
        self.field_count = 0

    # -- llhttp callbacks --

    def on_url(self, url: bytes) -> None:
        # httptools may deliver the target in pieces
        self.url = self.url + url if self.url else url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body:  # a chunked body's trailer section: counted, not forwarded
            self.field_count += 1
            if self.field_count > self.settings.max_header_count:
                raise BadRequest(431, "too many trailer fields")
            return
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")  # trailing whitespace is not part of a field value
        self.field_count += 1
        self.field_bytes += len(name) + len(value)
        if len(name) in _LENGTHS:
            lname = name.lower()
            if lname == b"host":
                self.hosts += 1
                self.host = value
            elif lname in _NAMES and self._special_header(lname, value):
                return
        self.fields += (name, b": ", value, _CRLF)

    def _special_header(self, lname: bytes, value: bytes) -> bool:
        """Note a header the proxy acts on, other than Host; True when it must not be forwarded as it is."""
        if lname == b"content-length":
            self.content_length = value
            return False
        if lname == b"authorization":
            # NTLM and Negotiate authenticate the connection, not the request (RFC 4559): the
            # server connection that carries them is never handed to another client.
            if value[:9].lower().startswith((b"ntlm", b"negotiate")):
                self.unusual = True
                self.auth_pin = True
            return False
        self.unusual = True
        if lname == b"transfer-encoding":
            self.tes += 1
            self.te = value
        elif lname == b"connection":
            if self.connection is None:
                self.connection = []
            self.connection.append(value)
        elif lname == b"upgrade":
            self.upgrade = value
        elif lname == b"x-forwarded-for":
            if not self.settings.forwarded:
                return False
            if self.xff is None:
                self.xff = []
            self.xff.append(value)
        elif lname in (b"x-forwarded-proto", b"x-forwarded-host"):
            return self.settings.forwarded
        return True  # hop-by-hop, or X-Client-Cert-*: lbproxy's to say

    def on_headers_complete(self) -> None:
        parser = self.parser
        settings = self.settings
        method = parser.get_method()
        # llhttp keeps a request alive by default only in HTTP/1.1; without a Connection field that
        # tells the version apart without get_http_version(), which formats a string.
        version = "1.1" if not self.unusual and parser.should_keep_alive() else parser.get_http_version()
        url = self.url
        host = self.host
        te = self.te
        framing.check_request(method, version, url, host, self.hosts, te, self.tes, settings.max_target)
        if host is not None and host != self.checked_host:  # a client sends the same Host again and again
            framing.check_host(host)
            self.checked_host = host
        if self.field_count > settings.max_header_count:
            raise BadRequest(431, "too many header fields")
        if self.field_bytes > settings.max_header_size:
            raise BadRequest(431, "header block too large")
        content_length = self.content_length
        max_body = settings.max_body
        if max_body is not None and content_length is not None and int(content_length) > max_body:
            raise BadRequest(413, "request body too large")
        has_body = te is not None or (content_length is not None and content_length != b"0")
        client_11 = version == "1.1"
        fields = self.fields
        steer = settings.steer
        if steer is not None:  # before the head is built: a persistence cookie leaves `fields`
            client = self.client_ip
            trusted = settings.trusted
            if trusted is not None and self.xff is not None:  # a trusted proxy may say whose it is
                client = trusted.client(client, self.xff)
            pool, key = steer(method, url, host, fields, client)
        parts = [method, b" ", url, b" HTTP/1.1\r\n", *fields]
        upgrade = False
        if self.unusual:  # a Connection, Transfer-Encoding, Upgrade, Authorization or X-Forwarded-* field
            upgrade_to = self.upgrade
            tokens = framing.connection_tokens(self.connection) if self.connection else None
            if client_11:
                keep_alive = tokens is None or b"close" not in tokens
            else:
                keep_alive = tokens is not None and b"keep-alive" in tokens
            if tokens:
                named = tokens - framing.NOT_NAMEABLE
                if named:  # RFC 9110 §7.6.1: headers that Connection names are hop-by-hop too
                    parts[4:] = [
                        part
                        for index in range(0, len(fields), 4)
                        if fields[index].lower() not in named
                        for part in fields[index : index + 4]
                    ]
                if upgrade_to is not None and b"upgrade" in tokens:
                    if has_body:
                        # llhttp stops at the head of a request that asks to upgrade: its body would
                        # be parsed as the next request, or left owed to the server connection.
                        raise BadRequest(400, "a request that asks to upgrade has a body")
                    # h2c would tunnel HTTP/2 past every check here: strip it, answer in HTTP/1.1
                    upgrade = b"h2c" not in upgrade_to.lower()
            if upgrade and upgrade_to is not None:
                parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade_to, _CRLF)
            if te is not None:
                parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep_alive = client_11  # no Connection field: the version's default
        if host is None:
            parts += (b"Host: ", settings.default_host(), _CRLF)
        if settings.forwarded:
            if self.xff is not None:
                parts += (b"X-Forwarded-For: ", b", ".join(self.xff), b", ", self.client_ip, _CRLF)
            else:
                parts.append(self.forwarded_for)
            parts.append(settings.proto_field)
            if host is not None:
                parts += (b"X-Forwarded-Host: ", host, _CRLF)
        if self.client_cert:
            parts.append(self.client_cert)
        parts.append(_CRLF)
        head = self.make(method, url, b"".join(parts), client_11, keep_alive)
        if steer is not None:
            head.pool = pool
            head.key = key
            if client is not self.client_ip:
                head.client = client
        if has_body:
            head.has_body = True
            self.in_body = True
            head.chunked = te is not None
        head.upgrade = upgrade
        if self.auth_pin:
            head.pin = True

        # the next head starts from nothing
        self.url = b""
        self.fields = []
        self.field_count = 0
        self.field_bytes = 0
        self.host = None
        self.hosts = 0
        self.content_length = None
        if self.unusual:
            self.unusual = False
            self.auth_pin = False
            self.te = None
            self.tes = 0
            self.connection = None
            self.upgrade = None
            self.xff = None
        self.on_request(head)
