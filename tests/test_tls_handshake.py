"""The handshakes of a TLS listener (issue #16): each counted by how it ended, timed, and its version;
plain HTTP to the TLS port answered 400 as nginx does; the PROXY header before a handshake.

Real clients on 127.0.0.1: Python's `ssl` (asyncio's, and blocking sockets in a thread where a
session must be resumed or a PROXY header sent first) and raw sockets for what is not TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from lbproxy import metrics
from lbproxy.handshake import RESULTS, Handshakes, result_of
from lbproxy.http_proxy import HttpListener
from lbproxy.runtime import Runtime
from tests.support import Authority, Backend, Issued, chromium, eventually, port_of, running


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def config_text(backend: Backend, www: Issued, extra: str = "", listener: str = "") -> str:
    return (
        "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    pool: farm\n"
        f"{listener}"
        f"    tls:\n      certificates:\n        - {{{{cert: {www.cert}, key: {www.key}}}}}\n{extra}"
        f'pools:\n  farm:\n    servers:\n      - {{{{name: a, address: "{backend.address}"}}}}\n'
    )


def trusting(ca: Authority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.path))


def counts(lb: Runtime) -> Handshakes:
    listener = lb.listeners["web"]
    assert isinstance(listener, HttpListener)
    assert listener.handshakes is not None
    return listener.handshakes


async def ask(port: int, context: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="www.example.com")
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def refused(port: int, context: ssl.SSLContext) -> None:
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await answered(port, context)


async def answered(port: int, context: ssl.SSLContext) -> None:
    """Raises if the request gets no answer (TLS 1.3: a refused client certificate may only show
    at the first read)."""
    if not await ask(port, context):
        raise ConnectionResetError("closed without an answer")


async def raw(port: int, data: bytes) -> bytes:
    """Send `data` on a plain TCP connection; what comes back before the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_each_handshake_is_counted_by_how_it_ended(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    extra = "      min_version: TLSv1.3\n"
    async with Backend("a") as backend, running(config_text(backend, www, extra), tmp_path) as lb:
        port = port_of(lb)
        assert (await ask(port, trusting(ca))).startswith(b"HTTP/1.1 200 ")
        # A client that does not trust lbproxy's CA says so with an alert (asyncio's clients just close).
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(blocking_handshake, port, ssl.create_default_context())
        old = trusting(ca)
        old.maximum_version = ssl.TLSVersion.TLSv1_2  # below the listener's lowest
        await refused(port, old)
        handshakes = counts(lb)
        await eventually(lambda: handshakes.results["certificate_refused"] == 1)
        await eventually(lambda: handshakes.results["protocol_version"] == 1)
        assert handshakes.results["ok"] == 1
        assert handshakes.versions == {"TLSv1.3": 1}
        assert sum(handshakes.durations) == 1
        assert 0 < handshakes.duration_sum < 5
        assert len(backend.requests) == 1
        families = {family.name: family for family in metrics.families(metrics.read(lb))}
        results = {s.labels["result"]: s.value for s in families["lbproxy_listener_tls_handshakes"].samples}
        assert set(results) == set(RESULTS)
        assert (results["ok"], results["certificate_refused"], results["protocol_version"]) == (1, 1, 1)
        versions = {s.labels["version"]: s.value for s in families["lbproxy_listener_tls_versions"].samples}
        assert versions == {"TLSv1.3": 1}
        timed = families["lbproxy_listener_tls_handshake_duration_seconds"].samples
        assert [s.value for s in timed if s.name.endswith("_count")] == [1]
        assert lb.listener_states()[0]["tls_handshakes"]["results"] == {
            "ok": 1,
            "certificate_refused": 1,
            "protocol_version": 1,
        }


async def test_no_shared_cipher_is_its_own_result(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    extra = "      min_version: TLSv1.2\n      ciphers: ECDHE-ECDSA-AES256-GCM-SHA384\n"
    async with Backend("a") as backend, running(config_text(backend, www, extra), tmp_path) as lb:
        other = trusting(ca)
        other.maximum_version = ssl.TLSVersion.TLSv1_2
        other.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        await refused(port_of(lb), other)
        await eventually(lambda: counts(lb).results["no_shared_cipher"] == 1)
        same = trusting(ca)
        same.maximum_version = ssl.TLSVersion.TLSv1_2
        assert (await ask(port_of(lb), same)).startswith(b"HTTP/1.1 200 ")
        assert counts(lb).versions == {"TLSv1.2": 1}


async def test_client_certificates_missing_or_foreign_are_told_apart(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    strangers = Authority(tmp_path, "strangers")
    mallory = strangers.issue("mallory", "mallory.example.com")
    clients = Authority(tmp_path, "clients")
    extra = f"      client_ca: {clients.path}\n"
    async with Backend("a") as backend, running(config_text(backend, www, extra), tmp_path) as lb:
        await refused(port_of(lb), trusting(ca))
        foreign = trusting(ca)
        foreign.load_cert_chain(mallory.cert, mallory.key)
        await refused(port_of(lb), foreign)
        handshakes = counts(lb)
        await eventually(lambda: handshakes.results["client_certificate_missing"] == 1)
        await eventually(lambda: handshakes.results["client_certificate_invalid"] == 1)
        assert handshakes.results["ok"] == 0
        assert backend.requests == []


async def test_plain_http_to_the_tls_port_is_answered_400(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    async with Backend("a") as backend, running(config_text(backend, www), tmp_path) as lb:
        answer = await raw(port_of(lb), b"GET /x HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert b"Connection: close" in head
        assert body == b"plain HTTP to a TLS port\n"
        assert await raw(port_of(lb), b"\x00\x01\x02 junk") == b""  # neither TLS nor HTTP: closed
        handshakes = counts(lb)
        await eventually(lambda: handshakes.results["not_tls"] == 1)
        assert handshakes.results["plain_http"] == 1
        assert backend.requests == []
        assert (await ask(port_of(lb), trusting(ca))).startswith(b"HTTP/1.1 200 ")  # TLS still served


async def test_a_handshake_must_come_within_request_header_time(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    listener = "    timeouts:\n      request_header: 1s\n"
    async with Backend("a") as backend, running(config_text(backend, www, listener=listener), tmp_path) as lb:
        port = port_of(lb)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # says nothing
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.9 <= loop.time() - started < 4
        writer.close()
        # half a ClientHello, then silence: the handshake's own deadline, the same length
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # half a ClientHello, then the client goes
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        writer.close()
        handshakes = counts(lb)
        await eventually(lambda: handshakes.results["timeout"] == 2)
        await eventually(lambda: handshakes.results["closed"] == 1)
        assert backend.requests == []


def blocking_handshake(port: int, context: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        context.wrap_socket(plain, server_hostname="www.example.com").close()


def resumed_twice(port: int, ca: Authority) -> list[bool]:
    """Three connections, the later ones offering the first one's session: whether each resumed."""
    context = trusting(ca)
    session = None
    seen = []
    for _ in range(3):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as plain,
            context.wrap_socket(plain, server_hostname="www.example.com", session=session) as secure,
        ):
            secure.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := secure.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            seen.append(secure.session_reused)
            session = session or secure.session  # TLS 1.3: the ticket came after the handshake
    return seen


async def test_resumed_sessions_are_counted(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    async with Backend("a") as backend, running(config_text(backend, www), tmp_path) as lb:
        assert await asyncio.to_thread(resumed_twice, port_of(lb), ca) == [False, True, True]
        handshakes = counts(lb)
        await eventually(lambda: handshakes.results["ok"] == 3)
        assert handshakes.resumed == 2
        assert len(backend.requests) == 3


def proxied_request(port: int, ca: Authority, header: bytes) -> bytes:
    """A PROXY header in the clear, then TLS on the same connection, as an L4 balancer in front sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        plain.sendall(header)
        with trusting(ca).wrap_socket(plain, server_hostname="www.example.com") as secure:
            secure.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := secure.recv(4096):
                answer += chunk
            return answer


async def test_a_proxy_header_comes_before_the_handshake(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    listener = "    accept_proxy: true\n"
    async with Backend("a") as backend, running(config_text(backend, www, listener=listener), tmp_path) as lb:
        header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n"
        answer = await asyncio.to_thread(proxied_request, port_of(lb), ca, header)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        (request,) = backend.requests
        assert request.header(b"x-forwarded-for") == b"192.0.2.7"
        # a connection without the header is refused before any handshake
        assert await raw(port_of(lb), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") == b""
        listener_object = lb.listeners["web"]
        await eventually(lambda: listener_object.bad_proxy_headers == 1)
        assert len(backend.requests) == 1


async def test_the_status_page_shows_handshakes_and_days_left(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com", days=5)
    text = "admin:\n  bind: 127.0.0.1:0\n"
    async with Backend("a") as backend, running(text + config_text(backend, www), tmp_path) as lb:
        assert (await ask(port_of(lb), trusting(ca))).startswith(b"HTTP/1.1 200 ")
        assert (await raw(port_of(lb), b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        await eventually(lambda: counts(lb).results["plain_http"] == 1)
        with chromium(tmp_path) as browser:
            await asyncio.to_thread(browser.get, f"http://127.0.0.1:{lb.bound['admin'].port}/")
            script = """return [...document.querySelectorAll('[data-handshakes], [data-certificate]')]
                .map((line) => [line.textContent, line.className]);"""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (shown := await asyncio.to_thread(browser.execute_script, script)) != [
                ["certificate www.example.com: 4 days left", "meta expiring"],
                ["handshakes: 1 ok · 1 plain http", "meta"],
            ]:
                assert loop.time() < deadline, shown
                await asyncio.sleep(0.1)


def test_openssl_reasons_fold_into_the_results() -> None:
    def failure(reason: str) -> ssl.SSLError:
        error = ssl.SSLError(1, reason)
        error.reason = reason
        return error

    assert result_of(failure("NO_SHARED_CIPHER")) == "no_shared_cipher"
    assert result_of(failure("TLSV1_ALERT_UNKNOWN_CA")) == "certificate_refused"
    assert result_of(failure("SOMETHING_NEW")) == "other"
    assert result_of(ConnectionAbortedError("SSL handshake is taking longer")) == "timeout"
    assert result_of(ConnectionResetError()) == "closed"
    summed = Handshakes.of(Handshakes().numbers())
    summed.finished("TLSv1.3", True, 0.002)
    assert (summed.results["ok"], summed.resumed, summed.versions, sum(summed.durations)) == (1, 1, {"TLSv1.3": 1}, 1)
