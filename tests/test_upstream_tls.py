"""TLS from lbproxy to the servers (issue #16, server side): verification, the name checked, lbproxy's
client certificate, connections reused, and HTTPS probes.

The back-ends are tests.support.Backend serving HTTPS with certificates of a CA made here; each
accepted connection is one full handshake on the back-end's side, so `accepted` counts them.
"""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest

from lbproxy import config, metrics
from tests.support import NOW, Authority, Backend, Client, eventually, get, port_of, running


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def farm(backend: Backend, tls: str, health: str = "") -> str:
    return (
        "listeners:\n  - {{name: web, bind: 127.0.0.1:0, pool: farm}}\n"
        f"pools:\n  farm:\n    tls: {tls}\n{health}"
        f'    servers:\n      - {{{{name: a, address: "{backend.address}"}}}}\n'
    )


async def test_requests_go_over_verified_tls_on_one_reused_connection(tmp_path: Path, ca: Authority) -> None:
    issued = ca.issue("app", "app.example.com")
    backend = Backend("a", tls=ca.server_context(issued))
    settings = f"{{{{ca: {ca.path}, server_name: app.example.com}}}}"
    async with backend, running(farm(backend, settings), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            for index in range(5):
                await client.send(b"GET /%d HTTP/1.1\r\nHost: www.example.com\r\n\r\n" % index)
                response = await client.response()
                assert (response.status, response.body) == (200, b"a")
        assert [request.target for request in backend.requests] == [b"/%d" % index for index in range(5)]
        assert backend.accepted == 1  # one handshake: the connection is kept and reused
        assert backend.requests[0].header(b"host") == b"www.example.com"  # the Host goes on untouched


async def test_new_connections_resume_the_servers_tls_session(tmp_path: Path, ca: Authority) -> None:
    def closing(request: object, transport: asyncio.Transport) -> None:  # every connection used once
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\na")
        transport.close()

    issued = ca.issue("app", "app.example.com")
    backends = [Backend(name, respond=closing, tls=ca.server_context(issued)) for name in "ab"]
    settings = f"{{{{ca: {ca.path}, server_name: app.example.com}}}}"
    async with backends[0], backends[1]:
        text = farm(backends[0], settings) + f'      - {{{{name: b, address: "{backends[1].address}"}}}}\n'
        async with running(text, tmp_path) as lb:
            for _ in range(8):  # round robin: four new connections to each server
                assert (await get(port_of(lb))).status == 200
            for backend in backends:  # each server's own session, offered again: only the first is full
                assert backend.accepted == 4
                assert [t.get_extra_info("ssl_object").session_reused for t in backend.transports] == [
                    False,
                    True,
                    True,
                    True,
                ]
            families = {family.name: family for family in metrics.families(metrics.read(lb))}
            counted = {
                (sample.name, sample.labels["server"]): sample.value
                for name in ("lbproxy_server_tls_handshakes", "lbproxy_server_tls_resumptions")
                for sample in families[name].samples
                if sample.name.endswith("_total")
            }
            assert counted == {
                ("lbproxy_server_tls_handshakes_total", "a"): 4,
                ("lbproxy_server_tls_handshakes_total", "b"): 4,
                ("lbproxy_server_tls_resumptions_total", "a"): 3,
                ("lbproxy_server_tls_resumptions_total", "b"): 3,
            }


async def test_the_name_checked_is_the_servers_host_by_default(tmp_path: Path, ca: Authority) -> None:
    issued = ca.issue("ip", "127.0.0.1")  # the server's host as written in the config
    backend = Backend("a", tls=ca.server_context(issued))
    async with backend, running(farm(backend, f"{{{{ca: {ca.path}}}}}"), tmp_path) as lb:
        assert (await get(port_of(lb))).body == b"a"


async def test_a_certificate_for_another_name_is_refused_unless_verify_is_off(tmp_path: Path, ca: Authority) -> None:
    issued = ca.issue("other", "other.example.com")
    backend = Backend("a", tls=ca.server_context(issued))
    settings = f"{{{{ca: {ca.path}, server_name: app.example.com}}}}"
    async with backend, running(farm(backend, settings), tmp_path) as lb:
        response = await get(port_of(lb))
        assert response.status == 502
        assert backend.requests == []
        server = lb.pools["farm"].servers[0]
        assert server.connect_failures >= 1
    unverified = f"{{{{ca: {ca.path}, server_name: app.example.com, verify: false}}}}"
    async with backend, running(farm(backend, unverified), tmp_path) as lb:
        assert (await get(port_of(lb))).body == b"a"


async def test_lbproxy_presents_its_client_certificate(tmp_path: Path, ca: Authority) -> None:
    clients = Authority(tmp_path, "clients")
    mine = clients.issue("lb", "lb.example.com")
    issued = ca.issue("app", "app.example.com")
    backend = Backend("a", tls=ca.server_context(issued, clients=clients))
    without = f"{{{{ca: {ca.path}, server_name: app.example.com}}}}"
    async with backend, running(farm(backend, without), tmp_path) as lb:
        assert (await get(port_of(lb))).status == 502  # the back-end wants a client certificate
    with_cert = f"{{{{ca: {ca.path}, server_name: app.example.com, client_cert: {mine.cert}, client_key: {mine.key}}}}}"
    async with backend, running(farm(backend, with_cert), tmp_path) as lb:
        assert (await get(port_of(lb))).body == b"a"


async def test_https_probes_take_a_server_with_a_bad_certificate_out(tmp_path: Path, ca: Authority) -> None:
    wrong = ca.issue("other", "other.example.com")
    backend = Backend("a", tls=ca.server_context(wrong))
    settings = f"{{{{ca: {ca.path}, server_name: app.example.com}}}}"
    health = "    health: {{type: http, interval: 100ms, timeout: 1s, rise: 1, fall: 1}}\n"
    async with backend, running(farm(backend, settings, health), tmp_path) as lb:
        server = lb.pools["farm"].servers[0]
        await eventually(lambda: not server.up, what="the probe to take the server out")
        assert server.check_reason.startswith("certificate verify failed"), server.check_reason
    right = ca.issue("app", "app.example.com")
    backend = Backend("b", tls=ca.server_context(right))
    async with backend, running(farm(backend, settings, health), tmp_path) as lb:
        server = lb.pools["farm"].servers[0]
        await eventually(lambda: server.checks[1] >= 2, what="two probes")
        assert server.up
        assert server.check_reason == "HTTP 200"


def test_pool_tls_config_errors_and_the_verify_warning(tmp_path: Path, ca: Authority) -> None:
    issued = ca.issue("app", "app.example.com")
    path = tmp_path / "lbproxy.yaml"
    path.write_text(
        "listeners:\n  - {name: l4, bind: 127.0.0.1:0, pool: farm, mode: tcp}\n"
        f"pools:\n  farm:\n    tls: {{client_cert: {issued.cert}}}\n"
        "    servers:\n      - {name: a, address: 127.0.0.1:8080}\n"
    )
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    found = [str(problem) for problem in caught.value.problems]
    assert any("client_cert and client_key go together" in line for line in found), found
    path.write_text(
        "listeners:\n  - {name: l4, bind: 127.0.0.1:0, pool: farm, mode: tcp}\n"
        "pools:\n  farm:\n    tls: {verify: false}\n    servers:\n      - {name: a, address: 127.0.0.1:8080}\n"
    )
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    assert "a tcp listener passes TLS through untouched" in str(caught.value.problems[0])
    path.write_text(path.read_text().replace(", mode: tcp", ""))
    loaded = config.load(path, environ={})
    assert (
        loaded.summary()
        .splitlines()[1]
        .endswith("warning: pools.farm.tls.verify: false: the servers' certificates are not checked")
    )


async def test_lbproxys_client_certificate_expiry_is_measured_and_warned_of(tmp_path: Path, ca: Authority) -> None:
    clients = Authority(tmp_path, "clients")
    mine = clients.issue("lb", "lb.example.com", days=3)
    issued = ca.issue("app", "app.example.com")
    backend = Backend("a", tls=ca.server_context(issued, clients=clients))
    settings = f"{{{{ca: {ca.path}, server_name: app.example.com, client_cert: {mine.cert}, client_key: {mine.key}}}}}"
    async with backend, running(farm(backend, settings), tmp_path) as lb:
        (warning,) = lb.config.warnings()
        assert warning.startswith(f"pools.farm.tls: {mine.cert} expires on "), warning
        families = {family.name: family for family in metrics.families(metrics.read(lb))}
        (sample,) = families["lbproxy_pool_tls_client_certificate_expiry_timestamp_seconds"].samples
        assert sample.labels == {"pool": "farm"}
        assert abs(sample.value - (NOW + datetime.timedelta(days=3)).timestamp()) < 5
