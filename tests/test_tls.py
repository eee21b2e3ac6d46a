"""TLS listeners (issue #16, client side): several certificates chosen by SNI, the lowest version, ALPN,
certificates checked before anything listens and reloaded in place, and `redirect_https`.

The certificates are made here: a CA, server certificates for www.example.com, api.example.com and
*.apps.example.com, an expired one and one whose key is another's. Clients are Python's `ssl` (the
certificate a handshake got, ALPN, versions) and `curl --resolve`, which sends SNI as a browser does;
every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lbproxy import config, metrics
from lbproxy.runtime import Runtime
from tests.support import NOW, Authority, Backend, Client, Issued, chromium, port_of, running


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def tls_config(backend: Backend, *issued: Issued, extra: str = "") -> str:
    certificates = "".join(f"        - {{{{cert: {one.cert}, key: {one.key}}}}}\n" for one in issued)
    return (
        "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    pool: farm\n    tls:\n"
        f"      certificates:\n{certificates}{extra}"
        f'pools:\n  farm:\n    servers:\n      - {{{{name: a, address: "{backend.address}"}}}}\n'
    )


def client_context(ca: Authority) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.path))
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def handshake(port: int, context: ssl.SSLContext, server_name: str | None) -> tuple[list[str], str | None]:
    """(the DNS names of the certificate the handshake got, the ALPN protocol), after one request through."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_name)
    try:
        certificate = writer.get_extra_info("peercert")
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        writer.close()
    return [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"], alpn


async def test_sni_picks_each_certificate_and_no_sni_gets_the_first(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    api = ca.issue("api", "api.example.com")
    apps = ca.issue("apps", "*.apps.example.com")
    async with Backend("a") as backend, running(tls_config(backend, www, api, apps), tmp_path) as lb:
        port = port_of(lb)
        context = client_context(ca)
        assert await handshake(port, context, "www.example.com") == (["www.example.com"], "http/1.1")
        assert await handshake(port, context, "api.example.com") == (["api.example.com"], "http/1.1")
        assert (await handshake(port, context, "shop.apps.example.com"))[0] == ["*.apps.example.com"]
        blind = ssl.create_default_context(cafile=str(ca.path))
        blind.check_hostname = False
        # no SNI, or a name no certificate has (a wildcard covers one label only): the first certificate
        assert (await handshake(port, blind, None))[0] == ["www.example.com"]
        assert (await handshake(port, blind, "a.b.apps.example.com"))[0] == ["www.example.com"]
        assert (await handshake(port, blind, "other.example.org"))[0] == ["www.example.com"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_resolve_gets_the_certificate_of_its_name(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    api = ca.issue("api", "api.example.com")
    async with Backend("a") as backend, running(tls_config(backend, www, api), tmp_path) as lb:
        port = port_of(lb)
        process = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "--cacert",
            str(ca.path),
            "--resolve",
            f"api.example.com:{port}:127.0.0.1",
            f"https://api.example.com:{port}/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 20)
        # curl verifies the certificate against the name it asked for: only api's passes
        assert (process.returncode, out) == (0, b"a"), err
        assert backend.requests[-1].header(b"x-forwarded-proto") == b"https"


async def test_min_version_refuses_an_older_client(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    extra = "      min_version: TLSv1.3\n"
    async with Backend("a") as backend, running(tls_config(backend, www, extra=extra), tmp_path) as lb:
        port = port_of(lb)
        old = client_context(ca)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # an alert, or the connection dropped
            await asyncio.open_connection("127.0.0.1", port, ssl=old, server_hostname="www.example.com")
        assert (await handshake(port, client_context(ca), "www.example.com"))[0] == ["www.example.com"]


async def test_a_reload_brings_new_certificates_to_new_handshakes(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    api = ca.issue("api", "api.example.com")
    async with Backend("a") as backend, running(tls_config(backend, www), tmp_path) as lb:
        port = port_of(lb)
        context = client_context(ca)
        with pytest.raises(ssl.SSLCertVerificationError):  # api.example.com is not served yet
            await handshake(port, context, "api.example.com")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="www.example.com"
        )
        (tmp_path / "lbproxy.yaml").write_text(tls_config(backend, www, api).replace("{{", "{").replace("}}", "}"))
        assert await lb.reload() == []
        assert lb.bound["web"].port == port  # the same socket: loaded in place
        assert (await handshake(port, context, "api.example.com"))[0] == ["api.example.com"]
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # the open connection goes on
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()


def errors(text: str, folder: Path) -> list[str]:
    path = folder / "lbproxy.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    return [str(problem) for problem in caught.value.problems]


def test_certificates_that_cannot_serve_are_config_errors_naming_the_file(tmp_path: Path, ca: Authority) -> None:
    backend = Backend("a", port=8080)
    www = ca.issue("www", "www.example.com")
    expired = ca.issue("old", "old.example.com", days=-1)
    stolen = ca.issue("stolen", "api.example.com", key_of=www)
    again = ca.issue("again", "www.example.com")
    text = tls_config(backend, www, expired, stolen, again).replace("{{", "{").replace("}}", "}")
    found = errors(text, tmp_path)
    assert any(f"{expired.cert}: expired on " in line for line in found), found
    assert any(f"{stolen.key}: this key is not the key of {stolen.cert}" in line for line in found), found
    assert any(f"{again.cert}: no name can reach it: {www.cert} comes first" in line for line in found), found
    bad_ciphers = tls_config(backend, www, extra="      ciphers: NOT-A-CIPHER\n").replace("{{", "{").replace("}}", "}")
    assert any("OpenSSL knows no cipher in 'NOT-A-CIPHER'" in line for line in errors(bad_ciphers, tmp_path))


def test_the_one_certificate_form_still_works(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    path = tmp_path / "lbproxy.yaml"
    path.write_text(
        "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    pool: farm\n"
        f"    tls: {{cert: {www.cert}, key: {www.key}}}\n"
        "pools:\n  farm:\n    servers:\n      - {name: a, address: 127.0.0.1:8080}\n"
    )
    loaded = config.load(path, environ={})
    settings = loaded.listeners[0].tls
    assert settings is not None
    assert [certificate.names for certificate in settings.certificates] == [("www.example.com",)]


# -- redirect_https ---------------------------------------------------------------------------------------

REDIRECT = """
listeners:
  - {{name: web, bind: "127.0.0.1:0", redirect_https: {port}}}
pools:
  farm:
    servers:
      - {{name: a, address: "{backend}"}}
"""


@pytest.mark.parametrize(
    ("port", "host", "target", "location"),
    [
        (8443, b"www.example.com", b"/", b"https://www.example.com:8443/"),
        (
            8443,
            b"www.example.com:8080",
            b"/a%2Fb/../c?q=1&r=%20#x",
            b"https://www.example.com:8443/a%2Fb/../c?q=1&r=%20#x",
        ),
        (443, b"WWW.Example.com:80", b"//double//slash;p=1", b"https://www.example.com//double//slash;p=1"),
        (443, b"[::1]:8080", b"/v6", b"https://[::1]/v6"),
        (443, b"www.example.com", b"http://www.example.com/abs?x", b"https://www.example.com/abs?x"),
    ],
)
async def test_redirect_https_answers_308_to_the_same_target(
    tmp_path: Path, port: int, host: bytes, target: bytes, location: bytes
) -> None:
    async with Backend("a") as backend, running(REDIRECT, tmp_path, port=port, backend=backend.address) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host))
            response = await client.response()
            assert (response.status, response.header(b"location")) == (308, location)
        assert backend.requests == []  # nothing is forwarded
        listener = lb.listeners["web"]
        assert getattr(listener, "errors", None) == {308: 1}


async def test_redirect_https_without_a_host_is_400(tmp_path: Path) -> None:
    async with Backend("a") as backend, running(REDIRECT, tmp_path, port=8443, backend=backend.address) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET / HTTP/1.0\r\n\r\n")
            assert (await client.response()).status == 400
        assert backend.requests == []


def test_redirect_https_takes_no_pool_tls_or_routes(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    text = (
        "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    redirect_https: 8443\n    pool: farm\n"
        f"    tls: {{cert: {www.cert}, key: {www.key}}}\n"
        "pools:\n  farm:\n    servers:\n      - {name: a, address: 127.0.0.1:8080}\n"
    )
    found = errors(text, tmp_path)
    assert any("listeners[0].pool: a redirect_https listener answers every request" in line for line in found)
    assert any("listeners[0].tls: a redirect_https listener answers every request" in line for line in found)


async def test_a_runtime_without_tls_listeners_builds_no_context(tmp_path: Path) -> None:
    async with Backend("a") as backend, running(REDIRECT, tmp_path, port=8443, backend=backend.address) as lb:
        assert isinstance(lb, Runtime)
        assert lb._contexts == {}


# -- mutual TLS -------------------------------------------------------------------------------------------


async def test_mutual_tls_passes_the_subject_on_and_refuses_other_clients(tmp_path: Path, ca: Authority) -> None:
    www = ca.issue("www", "www.example.com")
    clients = Authority(tmp_path, "clients")
    alice = clients.issue("alice", "alice.example.com")
    strangers = Authority(tmp_path, "strangers")
    mallory = strangers.issue("mallory", "mallory.example.com")
    extra = f"      client_ca: {clients.path}\n"
    async with Backend("a") as backend, running(tls_config(backend, www, extra=extra), tmp_path) as lb:
        port = port_of(lb)
        context = client_context(ca)
        context.load_cert_chain(alice.cert, alice.key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="www.example.com"
        )
        # the client's own X-Client-Cert-* never go on: lbproxy says whose certificate it was
        writer.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Client-Cert-Subject: CN=admin\r\nx-client-cert-verify: SUCCESS\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        (request,) = backend.requests
        assert request.header_lines(b"x-client-cert-subject") == [b"CN=alice.example.com"]
        assert request.header_lines(b"x-client-cert-verify") == [b"SUCCESS"]
        for certificate in (None, mallory):  # no certificate, or one from another CA: no request goes on
            other = client_context(ca)
            if certificate is not None:
                other.load_cert_chain(certificate.cert, certificate.key)
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await refused_after_handshake(port, other)
        assert len(backend.requests) == 1


async def refused_after_handshake(port: int, context: ssl.SSLContext) -> None:
    """Connect and ask; raises when the server refuses (TLS 1.3: it judges the client's certificate
    after the client's side of the handshake is done, so the refusal may come with the first read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="www.example.com")
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    if not await asyncio.wait_for(reader.read(), 5):
        raise ConnectionResetError("closed without an answer")


PLAIN = REDIRECT.replace("redirect_https: {port}", "pool: farm")


async def test_a_client_cannot_forge_the_certificate_headers_on_a_plain_listener(tmp_path: Path) -> None:
    async with Backend("a") as backend, running(PLAIN, tmp_path, backend=backend.address) as lb:
        async with await Client.connect(port_of(lb)) as client:
            forged = b"X-Client-Cert-Subject: CN=admin\r\nX-Client-Cert-Verify: SUCCESS\r\n"
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n" + forged + b"\r\n")
            assert (await client.response()).status == 200
        (request,) = backend.requests
        assert request.header(b"x-client-cert-subject") is None
        assert request.header(b"x-client-cert-verify") is None


def test_a_subject_cannot_break_the_header_line() -> None:
    from lbproxy.tls import subject

    peer = {"subject": ((("countryName", "FR"),), (("organizationName", "Ex, Inc"),), (("commonName", "a\r\nX: y"),))}
    assert subject(peer) == "CN=a\\0D\\0AX: y,O=Ex\\, Inc,C=FR"
    assert subject(None) == ""


async def test_a_tls_handshake_to_a_plain_port_is_closed_and_counted(tmp_path: Path, ca: Authority) -> None:
    async with Backend("a") as backend, running(PLAIN, tmp_path, backend=backend.address) as lb:
        port = port_of(lb)
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca), server_hostname="www.example.com")
        listener = lb.listeners["web"]
        assert getattr(listener, "wrong_protocol", None) == 1
        assert backend.requests == []
        async with await Client.connect(port) as client:  # plain HTTP still served
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.response()).status == 200


async def test_expiry_is_warned_of_measured_and_shown(tmp_path: Path, ca: Authority) -> None:
    soon = ca.issue("soon", "soon.example.com", days=5)
    later = ca.issue("later", "later.example.com", days=60)
    async with Backend("a") as backend, running(tls_config(backend, soon, later), tmp_path) as lb:
        (line,) = lb.config.warnings()
        assert line.startswith(f"listeners[0].tls: {soon.cert} expires on "), line
        assert line.endswith(" days"), line
        state = lb.listener_states()[0]
        days = {entry["name"]: entry["days_left"] for entry in state["certificates"]}
        assert days["soon.example.com"] in (4, 5), days
        assert days["later.example.com"] in (59, 60), days
        families = {family.name: family for family in metrics.families(metrics.read(lb))}
        samples = {
            s.labels["name"]: s.value for s in families["lbproxy_tls_certificate_expiry_timestamp_seconds"].samples
        }
        assert abs(samples["soon.example.com"] - (NOW + datetime.timedelta(days=5)).timestamp()) < 5


async def test_a_browser_loads_a_page_through_a_tls_listener(tmp_path: Path, ca: Authority) -> None:
    """Headless Chromium, trusting the test certificate (by its key, as Chromium lets a test do),
    asks for www.example.com: SNI, the handshake, ALPN and the request all go through."""
    www = ca.issue("www", "www.example.com")
    api = ca.issue("api", "api.example.com")
    leaf = x509.load_pem_x509_certificate(www.cert.read_bytes())
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    async with Backend("a") as backend, running(tls_config(backend, www, api), tmp_path) as lb:
        port = port_of(lb)
        arguments = (f"--ignore-certificate-errors-spki-list={pin}", "--host-resolver-rules=MAP * 127.0.0.1")
        with chromium(tmp_path, *arguments) as driver:
            await asyncio.to_thread(driver.get, f"https://www.example.com:{port}/page")
            body = await asyncio.to_thread(driver.execute_script, "return document.body.innerText")
        assert body.strip() == "a"
        (request,) = [request for request in backend.requests if request.target == b"/page"]  # and a favicon
        assert request.header(b"host") == f"www.example.com:{port}".encode()
        assert request.header(b"x-forwarded-proto") == b"https"
