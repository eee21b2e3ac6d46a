"""The server side of the L7 proxy: `UpstreamConnection`, one connection to one server.

It sends what its client side (`http_proxy.HttpProxy`) writes to it, and relays the responses back:
llhttp checks each response head, and the head goes on as the server sent it, less the hop-by-hop
lines (`framing.ResponseHead`), with lbproxy's framing lines after it; a body is relayed as it
comes, re-chunked or counted against its Content-Length. After a response it goes back to the
listener's idle stack for its endpoint, or is closed; after a 101 it becomes the server leg of a
`flow.Relay`. It knows the client side and the listener only through the two protocols below, so
that this module sits under `http_proxy` and imports nothing from it.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from typing import TYPE_CHECKING, Final, cast

import httptools
from mypy_extensions import trait

from lbproxy import flow, framing
from lbproxy.transaction import RELAYING
from lbproxy.upstream import Reusable

if TYPE_CHECKING:
    from typing import TypeAlias

    from lbproxy.hedging import Hedging
    from lbproxy.pool import Server
    from lbproxy.transaction import Exchange as GenericExchange
    from lbproxy.upstream import Endpoint, IdleConnections

    Exchange: TypeAlias = GenericExchange["UpstreamConnection"]

CRLF: Final = b"\r\n"
CHUNK_END: Final = b"0\r\n\r\n"

# How a relayed response head ends, by (chunked to the client, client kept alive, client HTTP/1.1).
HEAD_ENDS: Final = {
    (chunked, keep, client_11): (b"Transfer-Encoding: chunked\r\n" if chunked else b"")
    + (b"Connection: close\r\n" if not keep else b"" if client_11 else b"Connection: keep-alive\r\n")
    + b"\r\n"
    for chunked in (False, True)
    for keep in (False, True)
    for client_11 in (False, True)
}


@trait
class Listening:
    """What a server connection needs of its listener (`http_proxy.HttpListener`). A trait, inherited
    by its implementer, as `request_head.Settings` is: compiled code reaches it without name lookups."""

    __slots__ = ()

    loop: asyncio.AbstractEventLoop
    outbox: flow.Outbox
    idle: dict[Endpoint, IdleConnections[UpstreamConnection]]
    max_header_size: int
    draining: bool
    secure: bool

    @abstractmethod
    def idle_for(self, server: Server) -> IdleConnections[UpstreamConnection]:
        raise NotImplementedError


@trait
class ClientSide:
    """What a server connection needs of the client connection it serves (`http_proxy.HttpProxy`); a
    trait, as `Listening` is. The listener is the connection's own (`UpstreamConnection.listener`):
    a trait's attribute keeps its type in the class that inherits it, and `HttpProxy.listener` is the
    narrower `HttpListener`."""

    __slots__ = ()

    loop: asyncio.AbstractEventLoop
    gate: flow.ReadGate | None
    client_eof: bool
    closed: bool
    pinned: UpstreamConnection | None

    @abstractmethod
    def flush(self, parts: list[bytes]) -> None:
        raise NotImplementedError

    @abstractmethod
    def write(self, data: bytes) -> None:
        raise NotImplementedError

    @abstractmethod
    def exchange_done(self, exchange: Exchange, upstream: UpstreamConnection, pin: bool) -> None:
        raise NotImplementedError

    @abstractmethod
    def upstream_failed(
        self, exchange: Exchange, upstream: UpstreamConnection | None, reason: str, timeout: bool
    ) -> None:
        raise NotImplementedError

    @abstractmethod
    def start_tunnel(self, upstream: UpstreamConnection) -> flow.Relay:
        raise NotImplementedError

    @abstractmethod
    def first_byte(self, exchange: Exchange, upstream: UpstreamConnection, hedging: Hedging) -> None:
        raise NotImplementedError

    @abstractmethod
    def extend_response_deadline(self) -> None:
        raise NotImplementedError

    @abstractmethod
    def close_now(self) -> None:
        raise NotImplementedError


class UpstreamConnection(asyncio.Protocol, Reusable):
    """The server side of the L7 proxy: one connection to one server, serving one exchange at a time.

    llhttp is fed a response's head and, when the body is chunked, its body: it checks both and
    calls back. A Content-Length body, or one the server's close delimits, is counted and relayed as
    it comes, the bytes uvloop read passed on untouched, as the L4 proxy does. When such a body came
    whole in the read that ended its head (a small response), llhttp is fed it too and is ready for
    the next response; otherwise the parser is spent, and the next response gets a new one.
    """

    __slots__ = (
        "server",
        "listener",
        "transport",
        "gate",
        "parser",
        "spent",
        "proxy",
        "exchange",
        "in_head",
        "head_buffer",
        "head",
        "left",
        "response_started",
        "reused",
        "reusable",
        "chunked_out",
        "framing",
        "complete",
        "relay",
        "closed",
        "pin",
        "served",
        "out",
        "busy",
        "eof",
        "hedged",
    )

    # httptools looks up every callback when it makes a parser, as it does once per response here:
    # those we leave out are found as None, not searched for through the class hierarchy in vain.
    on_message_begin = None
    on_status = None
    on_header = None
    on_chunk_header = None
    on_chunk_complete = None

    def __init__(self, server: Server, listener: Listening) -> None:
        self.server = server
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.gate: flow.ReadGate | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.spent = False  # the parser stopped inside a body that was relayed without it
        self.proxy: ClientSide | None = None
        self.exchange: Exchange | None = None
        self.in_head = True  # the next bytes from the server are a response head
        self.head_buffer = b""  # the bytes of a head that has not all arrived
        self.head = b""  # the head llhttp is being fed, status line to last CRLF, for on_headers_complete
        self.left = 0  # bytes of a Content-Length body still to relay
        self.response_started = False
        self.reused = False  # served an exchange before this one
        self.reusable = True
        self.chunked_out = False
        self.framing = framing.NO_BODY
        self.complete = False
        self.relay: flow.Relay | None = None  # after a 101: bytes both ways, untouched
        self.closed = False
        self.pin = False
        self.served = 0
        self.out: list[bytes] = []  # bytes for the client, gathered during one read, written at once
        self.busy = False  # the server is not reading what we write (pause_writing)
        self.hedged = False  # a HedgedConnection: its requests may race a second server (a slot: read per request)

    def is_open(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.listener.outbox.flush()
            flow.linger(self.listener.loop, self.transport)

    def abandon(self) -> None:
        """Drop the connection mid-exchange: detach it first so its loss is not reported."""
        self.proxy = None
        self.exchange = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def begin(self, proxy: ClientSide, exchange: Exchange) -> None:
        if exchange.server is not None:
            self.server = exchange.server  # servers at one endpoint share its idle connections
        self.reused = self.served > 0
        self.proxy = proxy
        self.exchange = exchange
        self.response_started = False
        if self.spent:
            self.parser = httptools.HttpResponseParser(self)
            self.spent = False

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.server.sent_bytes += len(data)
        self.listener.outbox.write(self.transport, data)

    def send_parts(self, parts: list[bytes]) -> None:
        self.send(b"".join(parts))

    def send_body(self, exchange: Exchange, body: bytes) -> None:
        if exchange.chunked:
            self.send_parts([b"%x\r\n" % len(body), body, CRLF])
        else:
            self.send(body)

    # -- connection events --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        flow.set_limits(transport)
        self.gate = flow.ReadGate(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        proxy = self.proxy
        exchange = self.exchange
        if self.relay is not None:
            if proxy is not None:
                proxy.close_now()
            return
        if proxy is None or exchange is None:
            return  # idle, or abandoned
        if self.framing == framing.UNTIL_CLOSE and exchange.phase >= RELAYING and not self.in_head:
            self._finish()  # RFC 9112 §6.3: the close delimits the body
            return
        self.proxy = None
        self.exchange = None
        self.server.failures += 1
        reason = "connection reset" if exc is not None else "connection closed"
        proxy.upstream_failed(exchange, self, reason, timeout=False)

    def eof_received(self) -> bool:
        proxy = self.proxy
        relay = self.relay
        if relay is None or proxy is None:
            return False  # outside a tunnel a server's FIN ends the connection: connection_lost decides
        if relay.server_ended():
            return True  # the client may still send, until it is done too
        proxy.close_now()
        return False

    def pause_writing(self) -> None:
        self.busy = True
        proxy = self.proxy
        if proxy is not None and proxy.gate is not None:
            proxy.gate.pause(flow.PEER_BUSY)

    def resume_writing(self) -> None:
        self.busy = False
        proxy = self.proxy
        if proxy is not None and proxy.gate is not None:
            proxy.gate.resume(flow.PEER_BUSY)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            if self.proxy is not None and not self.proxy.closed:
                relay.from_server(data)
            return
        self.server.received_bytes += len(data)
        proxy = self.proxy
        exchange = self.exchange
        if proxy is None or exchange is None or self.complete:
            self.close()  # nothing was asked: a server talking out of turn is not reused
            return
        self.response_started = True
        out = self.out
        try:
            headed = self.in_head  # llhttp gets this read up to the head's end
            if headed:
                data = self._read_head(data)
            if data:
                body = self.framing
                if body == framing.LENGTH:
                    left = self.left
                    if len(data) >= left:
                        if len(data) > left:  # more than the server announced: not one to reuse
                            self.reusable = False
                            data = data[:left]
                        self.complete = True
                        if headed and self.spent:
                            # The whole body came with its head: fed it as well, llhttp reaches the
                            # response's end and is ready for the next one (a new parser costs more).
                            self.parser.feed_data(data)
                            self.spent = False
                    self.left = left - len(data)
                    out.append(data)
                    exchange.response_bytes += len(data)
                elif body == framing.CHUNKED:
                    self.parser.feed_data(data)  # on_body re-frames it, on_message_complete ends it
                elif body == framing.UNTIL_CLOSE:
                    out.append(data)
                    exchange.response_bytes += len(data)
                else:
                    self.reusable = False  # bytes after a response that has no body
        except httptools.HttpParserUpgrade as upgrade:
            if out:
                proxy.flush(out)
                out.clear()
            self._switch(data[upgrade.args[0] :])
            return
        except (httptools.HttpParserError, ValueError) as error:
            cause = error.__context__
            out.clear()
            self._garbage(str(cause) if cause is not None else str(error))
            return
        if out:
            proxy.flush(out)
            out.clear()
        if self.complete:
            self._finish()
        else:
            proxy.extend_response_deadline()

    def _read_head(self, data: bytes) -> bytes:
        """Feed llhttp the response heads in `data`; returns the bytes that follow the final one."""
        offset = 0  # where in `data` the head being read continues (after interim responses)
        while True:
            rest = data[offset:] if offset else data
            buffer = self.head_buffer + rest if self.head_buffer else rest
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > self.listener.max_header_size:
                    raise ValueError("response head too large")
                self.head_buffer = buffer
                self.head = b""
                self.parser.feed_data(rest)  # llhttp sees garbage early; the head's end comes later
                return b""
            # In a strict llhttp head every line ends in CRLF, so the first blank line ends it.
            self.head = buffer[: end + 2]
            stop = offset + end + 4 - len(self.head_buffer)  # where the head ends in `data`
            self.head_buffer = b""
            try:
                self.parser.feed_data(data[offset:stop] if offset or stop < len(data) else data)
            except httptools.HttpParserUpgrade:
                raise httptools.HttpParserUpgrade(stop) from None  # the new protocol's bytes follow the head
            if self.head:
                raise ValueError("response head not understood")  # llhttp did not see it end there
            if not self.in_head or stop == len(data):
                return data[stop:] if stop < len(data) else b""
            offset = stop

    # -- httptools callbacks (the response parser) --

    def on_headers_complete(self) -> None:
        proxy = self.proxy
        exchange = self.exchange
        if proxy is None or exchange is None:
            return
        if not self.in_head:
            self.reusable = False  # a second response after a chunked one, unasked for
            return
        head_bytes = self.head
        if not head_bytes:
            raise ValueError("response head not understood")  # llhttp saw it end where we did not
        self.head = b""
        status = self.parser.get_status_code()
        if status == 101 and not exchange.upgrade:
            raise ValueError("101 Switching Protocols to a request that asked for no upgrade")
        # llhttp has checked the head; we relay its bytes, cut where hop-by-hop fields stand.
        head = framing.ResponseHead(head_bytes, status == 101)
        if not self.parser.should_keep_alive():  # HTTP/1.0 without keep-alive, Connection: close, or no length
            self.reusable = False
        if status < 200:
            if status == 101:
                exchange.status = 101
                self.out += (head.head, b"Connection: upgrade\r\n\r\n")
            else:
                self.out += (head.head, CRLF)  # an interim response (100 Continue); the final one follows
            exchange.phase = RELAYING
            return
        self.in_head = False
        exchange.status = status
        body = framing.response_framing(exchange.method, status, head.content_length, head.chunked)
        self.framing = body
        keep_client = exchange.keep_alive and not proxy.client_eof and not self.listener.draining
        self.chunked_out = False
        if body == framing.LENGTH:
            self.left = head.content_length  # type: ignore[assignment]
            if self.left:
                self.spent = True  # llhttp waits for the body we relay ourselves
            else:
                self.complete = True  # and llhttp has seen the response end
        elif body == framing.CHUNKED:
            if exchange.client_11:
                self.chunked_out = True
            else:
                keep_client = False  # an HTTP/1.0 client: the close delimits the body
        elif body == framing.UNTIL_CLOSE:
            self.spent = True
            keep_client = False
            self.reusable = False
        else:
            self.complete = True
            if exchange.method == b"HEAD":
                self.spent = True  # llhttp cannot be told the request was HEAD: it waits for a body
        if exchange.upgrade:
            keep_client = False  # the server declined to switch: the client's next bytes are not HTTP
        self.pin = head.pin
        exchange.phase = RELAYING
        if not keep_client:
            exchange.keep_alive = False
        out = self.out
        out.append(head.head)
        if exchange.cookie is not None:  # persistence: this client now sticks to this server
            out.append(exchange.cookie[self.listener.secure])
        if head.codings and self.chunked_out:
            # RFC 9112 §6.1: the codings before chunked go on as they came; lbproxy only re-chunks
            out += (
                b"Transfer-Encoding: ",
                head.codings,
                b", chunked\r\n",
                HEAD_ENDS[False, keep_client, exchange.client_11],
            )
        else:
            out.append(HEAD_ENDS[self.chunked_out, keep_client, exchange.client_11])

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None or self.complete:
            return
        exchange.response_bytes += len(body)
        if self.chunked_out:
            self.out += (b"%x\r\n" % len(body), body, CRLF)
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None or self.complete or self.in_head:
            return  # the end of an interim response, or of one with no body
        if self.chunked_out:
            self.out.append(CHUNK_END)
        self.complete = True

    # -- outcomes --

    def _finish(self) -> None:
        proxy = self.proxy
        exchange = self.exchange
        assert proxy is not None
        assert exchange is not None
        self.proxy = None
        self.exchange = None
        self.complete = False
        self.in_head = True
        self.served += 1
        gate = self.gate
        if gate is not None and gate.reasons:
            gate.resume(gate.reasons)  # an idle connection must read, to see the server close it
        if self.busy:
            # The server answered before it read all we wrote: the rest would be read as the next
            # request. And the client, paused while this leg was full, must not wait for it.
            self.reusable = False
            if proxy.gate is not None:
                proxy.gate.resume(flow.PEER_BUSY)
        # Once pinned (NTLM/Negotiate), a connection stays its client's: later responses need not
        # repeat it. A client that authenticates the connection first pins it too.
        pin = (self.pin or exchange.pin or proxy.pinned is self) and self.reusable and exchange.keep_alive
        if pin:
            pass  # stays with its client, outside the idle stack
        elif (
            self.reusable
            and exchange.request_done
            and not exchange.pin
            and not self.closed
            and not self.listener.draining
        ):
            listener = self.listener
            idle = listener.idle.get(self.server.endpoint)  # idle_for(), but for its first use
            if idle is None:
                idle = listener.idle_for(self.server)
            if not idle.put(self, proxy.loop.time()):
                self.close()
        else:
            self.close()
        proxy.exchange_done(exchange, self, pin)

    def _switch(self, rest: bytes) -> None:
        proxy = self.proxy
        exchange = self.exchange
        if proxy is None or exchange is None or not exchange.upgrade or exchange.status != 101:
            self._garbage("unexpected protocol switch")
            return
        self.relay = proxy.start_tunnel(self)
        if rest:
            proxy.write(rest)  # counted as it was read

    def _garbage(self, reason: str) -> None:
        proxy = self.proxy
        exchange = self.exchange
        self.proxy = None
        self.exchange = None
        self.server.failures += 1
        if self.transport is not None:
            self.transport.abort()
        self.closed = True
        if proxy is not None and exchange is not None:
            proxy.upstream_failed(exchange, self, f"invalid response: {reason}", timeout=False)


class HedgedConnection(UpstreamConnection):
    """A connection to a server of a pool that hedges (hedging.py): the first byte of a response to
    a request that may be hedged settles the race, before anything of it is relayed. Only these
    connections pay for the check."""

    __slots__ = ("watched",)

    def __init__(self, server: Server, listener: Listening) -> None:
        super().__init__(server, listener)
        self.hedged = True
        self.watched: Hedging | None = None  # set while the request it serves may be hedged

    def data_received(self, data: bytes) -> None:
        watched = self.watched
        if watched is not None:
            proxy = self.proxy
            exchange = self.exchange
            if proxy is not None and exchange is not None and self.relay is None:
                self.watched = None
                proxy.first_byte(exchange, self, watched)
        super().data_received(data)
