"""A first real-socket check that the support module and the L7 proxy fit together."""

from __future__ import annotations

from pathlib import Path

from tests.support import Backend, Client, port_of, running

CONFIG = """
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
      - {{name: b, address: "{b}"}}
"""


async def test_host_and_target_reach_the_server_byte_for_byte(tmp_path: Path) -> None:
    async with Backend("a") as a, Backend("b") as b, running(CONFIG, tmp_path, a=a.address, b=b.address) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /a%2Fb/../c?x=%41 HTTP/1.1\r\nHost: ExAmPle.COM:8080\r\n\r\n")
            response = await client.response()
        assert response.status == 200
        (request,) = a.requests + b.requests
        assert request.raw.startswith(b"GET /a%2Fb/../c?x=%41 HTTP/1.1\r\nHost: ExAmPle.COM:8080\r\n")
