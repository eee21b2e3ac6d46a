"""A back-end for benchmarks/overload.py: an app server with a fixed number of worker slots.

    python benchmarks/slots_backend.py NAME PORT [--slots 8] [--service-ms 20]

Listens on 127.0.0.1:PORT only. It behaves like an app server with a pool of SLOTS threads: each
request takes a slot for SERVICE-MS milliseconds (an `asyncio.sleep`-like timer, no CPU spent) and
is then answered `200` with NAME as its body; a request that arrives while every slot is busy is
answered `503` at once, as an overloaded app server does. Every answer carries `X-Served-By: NAME`,
so that a client can tell the back-end's 503s from a proxy's own, and is kept alive when the client
asks. Responses on one connection go out in the order of their requests.

`GET /_stats` is answered at once, outside the slots, with the back-end's own counts as JSON: `ok`
(requests served), `rejected` (503s sent), `abandoned` (served, but the connection was gone), and
`peak_busy` (the most slots busy at once, at most SLOTS). `/health` gets `200 ok` at once, uncounted.
Once it listens it prints `ready SECONDS` (its `time.monotonic()`); it runs until a signal stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque

from backend import Requests

BACKLOG = 511


class Farm:
    """The worker slots of one back-end and what it answered."""

    def __init__(self, name: str, slots: int, service: float) -> None:
        self.name = name.encode()
        self.slots = slots
        self.service = service
        self.busy = 0
        self.counts = {"ok": 0, "rejected": 0, "abandoned": 0, "peak_busy": 0}
        self.ok = {keep: self._reply(b"200 OK", self.name + b"\n", keep) for keep in (False, True)}
        self.busy_reply = {
            keep: self._reply(b"503 Service Unavailable", b"all workers busy\n", keep) for keep in (False, True)
        }
        self.health = {keep: self._reply(b"200 OK", b"ok\n", keep) for keep in (False, True)}

    def _reply(self, status: bytes, body: bytes, keep: bool, content_type: bytes = b"text/plain") -> bytes:
        return b"".join(
            (
                b"HTTP/1.1 %s\r\n" % status,
                b"X-Served-By: %s\r\n" % self.name,
                b"Content-Type: %s\r\n" % content_type,
                b"Content-Length: %d\r\n" % len(body),
                b"" if keep else b"Connection: close\r\n",
                b"\r\n",
                body,
            )
        )

    def stats(self, keep: bool) -> bytes:
        return self._reply(b"200 OK", json.dumps(self.counts).encode(), keep, b"application/json")


class Connection(Requests):
    """One client connection; its responses leave in the order of its requests."""

    def __init__(self, farm: Farm) -> None:
        super().__init__()
        self.farm = farm
        self.pending: deque[list[bytes | bool | None]] = deque()  # [response or None, close after]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def on_message_complete(self) -> None:
        farm = self.farm
        keep = self.parser.should_keep_alive()
        entry: list[bytes | bool | None] = [None, not keep]
        self.pending.append(entry)
        if self.url.startswith(b"/_stats"):
            entry[0] = farm.stats(keep)
        elif self.url.startswith(b"/health"):
            entry[0] = farm.health[keep]
        elif farm.busy >= farm.slots:
            farm.counts["rejected"] += 1
            entry[0] = farm.busy_reply[keep]
        else:
            farm.busy += 1
            farm.counts["peak_busy"] = max(farm.counts["peak_busy"], farm.busy)
            asyncio.get_running_loop().call_later(farm.service, self._done, entry, keep)
            return
        self._flush()

    def _done(self, entry: list[bytes | bool | None], keep: bool) -> None:
        farm = self.farm
        farm.busy -= 1
        if self.transport is None or self.transport.is_closing():
            farm.counts["abandoned"] += 1
        else:
            farm.counts["ok"] += 1
        entry[0] = farm.ok[keep]
        self._flush()

    def _flush(self) -> None:
        while self.pending and self.pending[0][0] is not None:
            response, close = self.pending.popleft()
            transport = self.transport
            if transport is None or transport.is_closing():
                self.pending.clear()
                return
            transport.write(response)  # type: ignore[arg-type]
            if close:
                transport.close()
                self.pending.clear()
                return


async def serve(farm: Farm, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(farm), "127.0.0.1", port, reuse_address=True, backlog=BACKLOG)
    print(f"ready {time.monotonic():.6f}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("port", type=int)
    parser.add_argument("--slots", type=int, default=8, help="worker slots (default 8)")
    parser.add_argument("--service-ms", type=float, default=20.0, help="milliseconds per request (default 20)")
    args = parser.parse_args()
    farm = Farm(args.name, args.slots, args.service_ms / 1000)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(farm, args.port))
    except OSError as error:
        print(f"backend {args.name}: {error}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
