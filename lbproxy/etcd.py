"""A small etcd v3 client over etcd's own HTTP/JSON gateway (`/v3/...`), on aiohttp.

etcd serves its gRPC API as JSON too (grpc-gateway, in every etcd since 3.3, Debian's 3.4 included):
keys and values are base64, numbers are strings, and a watch is one long POST whose answer streams
one JSON object per event batch. lbproxy needs a handful of calls (put, range, delete, lease grant
and keep-alive, watch), so this is a page of code on the HTTP client lbproxy already has, rather
than a gRPC stack (aetcd and its kind) to install and keep up. Each call tries the endpoints in
turn, starting with the last that answered; `EtcdError` says that none did, or what etcd refused.

With a user name and password (etcd's authentication on), the client asks etcd for a token
(`auth/authenticate`) and sends it with every call; a call refused because the token has expired (etcd's
simple tokens live five minutes by default) gets a new token and is tried once more. TLS is the
session's: its connector carries the context (the CA, and a client certificate if etcd asks for one).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=5)  # one call; a watch has no total, only its connect


class EtcdError(Exception):
    """No endpoint answered, or etcd refused the call (the message says which)."""


class _Unauthenticated(EtcdError):
    """etcd wants a (new) token: none was sent, or it has expired."""


# etcd's messages for a call without a valid token (etcdserver/api/v3rpc/rpctypes)
_TOKEN_REFUSED = ("invalid auth token", "user name is empty")


@dataclass(frozen=True, slots=True)
class Event:
    """A change under a watched prefix: `value` None for a delete."""

    key: str
    value: bytes | None
    revision: int


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _text(data: str) -> str:
    return base64.b64decode(data).decode()


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (etcd's convention: the prefix
    with its last byte plus one)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


class Etcd:
    """etcd's v3 API through its JSON gateway, on one aiohttp session."""

    def __init__(
        self, endpoints: Sequence[str], session: aiohttp.ClientSession, credentials: tuple[str, str] | None = None
    ) -> None:
        self.endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self.session = session
        self.credentials = credentials  # (user, password), when etcd's authentication is on
        self._token: str | None = None
        self._first = 0  # the endpoint that answered last

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `/v3/PATH` on the first endpoint that answers; its JSON answer."""
        if self.credentials is None:
            return await self._post(path, body)
        if self._token is None:
            await self._authenticate()
        try:
            return await self._post(path, body)
        except _Unauthenticated:
            await self._authenticate()
            return await self._post(path, body)

    async def _authenticate(self) -> None:
        assert self.credentials is not None
        self._token = None
        user, password = self.credentials
        answer = await self._post("auth/authenticate", {"name": user, "password": password})
        self._token = str(answer.get("token", ""))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._first + step) % count
            url = f"{self.endpoints[index]}/v3/{path}"
            try:
                async with self.session.post(url, json=body, timeout=TIMEOUT, headers=self._headers()) as response:
                    text = await response.text()
                    try:
                        answer: dict[str, Any] = json.loads(text)
                    except ValueError:  # the gateway's own refusals are plain text
                        raise EtcdError(f"{url}: {response.status} {text.strip()[:200]}") from None
                    if response.status != 200:
                        why = str(answer.get("error") or answer.get("message") or response.status)
                        if any(refused in why for refused in _TOKEN_REFUSED):
                            raise _Unauthenticated(f"{url}: {why}")
                        raise EtcdError(f"{url}: {why}")
                    self._first = index
                    return answer
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                errors.append(f"{url}: {error or type(error).__name__}")
        raise EtcdError("no etcd endpoint answered: " + "; ".join(errors))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write `key`; the revision it made."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self.call("kv/put", body)
        return int(answer["header"]["revision"])

    async def delete(self, key: str) -> int:
        answer = await self.call("kv/deleterange", {"key": _b64(key)})
        return int(answer["header"]["revision"])

    async def get_prefix(self, prefix: str) -> tuple[int, dict[str, bytes]]:
        """Every key under `prefix` with its value, and the revision they were read at."""
        answer = await self.call("kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        found = {_text(kv["key"]): base64.b64decode(kv.get("value", "")) for kv in answer.get("kvs", ())}
        return int(answer["header"]["revision"]), found

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        answer = await self.call("lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def keep_alive(self, lease: int) -> int:
        """Renew `lease`; the seconds it has left (0: it has expired)."""
        answer = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.call("lease/revoke", {"ID": str(lease)})

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """Every change under `prefix` from `start_revision` on, as it happens, until the stream
        breaks (EtcdError: the caller reads a new snapshot and watches again from there)."""
        request = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": str(start_revision),
            }
        }
        if self.credentials is not None and self._token is None:
            await self._authenticate()
        url = f"{self.endpoints[self._first]}/v3/watch"
        try:
            async with self.session.post(
                url, json=request, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5), headers=self._headers()
            ) as response:
                if response.status != 200:
                    raise EtcdError(f"{url}: watch refused ({response.status})")
                async for line in response.content:
                    if not line.strip():
                        continue
                    parsed = json.loads(line)
                    if "error" in parsed:  # the stream's own refusal, e.g. an expired token
                        self._token = None  # the next round authenticates again
                        raise EtcdError(f"{url}: watch refused: {parsed['error'].get('message', parsed['error'])}")
                    message = parsed.get("result", {})
                    if message.get("canceled") or message.get("compact_revision"):
                        raise EtcdError(f"{url}: watch cancelled ({message.get('cancel_reason', 'compacted')})")
                    for event in message.get("events", ()):
                        kv = event["kv"]
                        deleted = event.get("type") == "DELETE"
                        value = None if deleted else base64.b64decode(kv.get("value", ""))
                        yield Event(_text(kv["key"]), value, int(kv["mod_revision"]))
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise EtcdError(f"{url}: watch broke: {error or type(error).__name__}") from None
        raise EtcdError(f"{url}: watch ended")
