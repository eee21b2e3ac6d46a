"""Session persistence: which server a client's requests stick to, decided without I/O.

Two mechanisms, both built once per pool (and rebuilt on a reload) from its list of servers:

- `CookieJar`, for `type: cookie`: lbproxy inserts a cookie whose value names the server by a keyed
  hash of the pool's and the server's names (`cookie_value`), the same on every lbproxy node and
  across restarts, and never the server's address. `find_cookie` takes it out of a request's Cookie
  header before the request goes upstream; `set_cookie_field` writes the Set-Cookie line.
- `Rendezvous`, for `type: source_ip` and `type: header`: consistent hashing with bounded loads
  (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2017) on weighted
  rendezvous (highest random weight) hashing: when one of N servers leaves or joins, about 1/N of the
  keys move and no others, and no server carries more than `factor` times its share of the load.

This module is generic over the server type: it reads a server only through the callables it is
given, and must not import `lbproxy.pool` (or anything that does). Every hash here is stable across
processes and machines (blake2b and integer arithmetic, never Python's salted `hash()`): a client
must land on the same server whichever lbproxy node serves it, before and after a restart.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Final, Generic, TypeVar

S = TypeVar("S")  # a server: hashable (by identity, as lbproxy's are)

REMEMBERED: Final = 100_000  # keys whose last server a pool keeps (source_ip, header): a few MB at most

COOKIE: Final = "cookie"
SOURCE_IP: Final = "source_ip"
HEADER: Final = "header"

# The key of the cookie hash. The optional configured secret is mixed into it (`_cookie_key`), so
# that nodes sharing a secret agree while nobody without it can compute a server's value. Changing
# this constant (or the derivation) sends every client with a cookie to a new server on upgrade.
_COOKIE_KEY: Final = b"lbproxy/persistence/cookie/v1"
_SERVER_PERSON: Final = b"lbproxy-server"  # blake2b personalisation: domain separation of the hashes
_KEY_PERSON: Final = b"lbproxy-key"

_MASK64: Final = (1 << 64) - 1
_UNIT52: Final = 2.0**-52

# RFC 6265 §4.1.1: cookie-name is an RFC 9110 token; cookie-value is cookie-octets (no whitespace,
# DQUOTE, comma, semicolon or backslash). Checked when a Set-Cookie line is built: a config value
# must never be able to split the header.
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_OCTETS: Final = re.compile(rb"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
_OWS: Final = b" \t"


def _cookie_key(secret: bytes) -> bytes:
    return hashlib.blake2b(secret, key=_COOKIE_KEY, digest_size=32).digest()


def _cookie_value(key: bytes, pool: str, server: str) -> bytes:
    encoded = pool.encode()
    # Length-prefixed, so that no two (pool, server) pairs give the same message.
    message = len(encoded).to_bytes(4, "big") + encoded + server.encode()
    return hashlib.blake2b(message, key=key, digest_size=8).hexdigest().encode("ascii")


def cookie_value(pool: str, server: str, secret: bytes = b"") -> bytes:
    """The persistence cookie's value for `server` of `pool`: 16 lowercase hex digits.

    A keyed blake2b of the two names: stable across nodes and restarts, changed by the secret, and
    it reveals neither the server's address nor, without the secret, which name it stands for.
    """
    return _cookie_value(_cookie_key(secret), pool, server)


def header_value(fields: list[bytes], wanted: bytes) -> bytes | None:
    """The value of the first header named `wanted` (lower-case) in a head's gathered fields
    (name, b": ", value, CRLF, ...), or None."""
    size = len(wanted)
    for index in range(0, len(fields), 4):
        name = fields[index]
        if len(name) == size and name.lower() == wanted:  # the length first: most names differ in it
            return fields[index + 2]
    return None


def find_cookie(header_value: bytes, name: bytes) -> tuple[bytes | None, bytes | None]:
    """The value of cookie `name` in one Cookie header value (or None), and the value without it.

    The second item is the header value with every occurrence of the cookie removed, byte-exact
    otherwise (each remaining pair keeps the separator before it; when the first pair goes, the one
    that follows loses its separator), or None when no cookie is left. Pairs are separated by ';'
    with optional whitespace (RFC 6265 §5.4 sends "; "); a name and a value are trimmed of whitespace
    (§5.2); names compare case-sensitively. If the cookie occurs several times, the first value is
    returned. A pair without '=' is a nameless cookie to browsers, never ours. Called once per
    Cookie header line (HTTP/2 clients may split cookies over several).
    """
    if name not in header_value:  # the common case: one C-level scan
        return None, header_value
    found: bytes | None = None
    kept: list[bytes] = []
    first_removed = False
    for index, pair in enumerate(header_value.split(b";")):
        key, equals, value = pair.partition(b"=")
        if equals and key.strip(_OWS) == name:
            if found is None:
                found = value.strip(_OWS)
            if index == 0:
                first_removed = True
        else:
            kept.append(pair)
    if found is None:
        return None, header_value
    rest = b";".join(kept)
    if first_removed:
        # The separator after a removed first pair is the leading whitespace of what follows.
        rest = rest.lstrip(_OWS)
    if not rest.strip(_OWS + b";"):
        return found, None
    return found, rest


def set_cookie_field(name: bytes, value: bytes, max_age: int | None, secure: bool) -> bytes:
    """The whole Set-Cookie header line that makes a client stick to the server that `value` names.

    `Path=/` so that the whole site sticks; `HttpOnly` since scripts have no business with it;
    `SameSite=Lax` (RFC 6265bis) so that it follows top-level navigation but not cross-site
    subrequests; `Secure` on a TLS listener; `Max-Age` only when configured, else a session cookie.
    The line depends only on the server and the listener: build it once per pair, not per response.
    Raises ValueError on a name or value that is not valid in a cookie (RFC 6265 §4.1.1), or a
    `max_age` under one second (Max-Age=0 would delete the cookie).
    """
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"not a valid cookie name: {name!r}")
    if _COOKIE_OCTETS.fullmatch(value) is None:
        raise ValueError(f"not a valid cookie value: {value!r}")
    parts = [b"Set-Cookie: ", name, b"=", value, b"; Path=/; HttpOnly"]
    if secure:
        parts.append(b"; Secure")
    parts.append(b"; SameSite=Lax")
    if max_age is not None:
        if max_age < 1:
            raise ValueError(f"max_age must be at least one second, not {max_age}")
        parts.append(b"; Max-Age=%d" % max_age)
    parts.append(b"\r\n")
    return b"".join(parts)


class CookieJar(Generic[S]):
    """The cookie values of one pool's servers, both ways, each a dict lookup.

    Built from the pool's servers (a reload builds a new one). A value that names no server (forged,
    stale, or from another pool) gives None: the request then goes to the policy, and the response
    sets a fresh cookie.
    """

    __slots__ = ("_servers", "_values")

    def __init__(self, pool: str, servers: Sequence[S], name_of: Callable[[S], str], secret: bytes = b"") -> None:
        key = _cookie_key(secret)
        self._servers: dict[bytes, S] = {}
        self._values: dict[S, bytes] = {}
        for server in servers:
            value = _cookie_value(key, pool, name_of(server))
            if value in self._servers:
                # Only two servers of one name get here (a 64-bit collision is ~never): refuse
                # rather than send one server's clients to the other.
                raise ValueError(f"two servers share the cookie value of {name_of(server)!r} in pool {pool!r}")
            self._servers[value] = server
            self._values[server] = value

    def server_for(self, value: bytes) -> S | None:
        """The server that cookie `value` names, or None."""
        return self._servers.get(value)

    def value_for(self, server: S) -> bytes:
        """The cookie value naming `server`; KeyError for a server not in the jar."""
        return self._values[server]


def _seed(name: str) -> int:
    """A server's 64-bit place on the hash, from its name alone (so a reload keeps it)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8, person=_SERVER_PERSON).digest()
    return int.from_bytes(digest, "big")


def _key_hash(key: bytes) -> int:
    """The 64-bit hash of a persistence key (a client's address, a header's value)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=_KEY_PERSON).digest(), "big")


def _mix(value: int) -> int:
    """splitmix64's finaliser (Steele, Lea, Flood 2014): a bijection of 64-bit ints with full avalanche.

    A server's score for a key is `_mix(_key_hash ^ seed)`: one blake2b per key, then a few integer
    operations per server. Being a bijection, two servers with different seeds never tie.
    """
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


class Rendezvous(Generic[S]):
    """Consistent hashing with bounded loads over a fixed list of servers.

    Each server gets a score for a key; the key's order is the servers by falling score. Removing a
    server takes it out of every order and changes nothing else, so only the keys it held move (each
    to the next in its order); adding one moves only the keys for which it scores highest, about
    1/(N+1) of them. With weights, a server's score is ln(u) / weight for a uniform u drawn from its
    hash (Schindelhauer and Schomaker's weighted rendezvous), so it is first for a share of the keys
    proportional to its weight.

    `pick` adds the bound on load of Mirrokni et al.: a key goes to the first server of its order
    whose load is under ceil(factor x (total load + 1) x weight / total weight), all over the usable
    servers (for equal weights: ceil(factor x (total + 1) / n)). So no server ever holds more than
    `factor` times its share, and a hot key spills over to the next servers of its order only, the
    same ones on every node. Weights are read once, here: a weight that changed at run time (slow
    start, dynamic ratio) would otherwise move keys; give configured ratios, and build a new
    Rendezvous when the servers or their ratios change.
    """

    __slots__ = ("_servers", "_seeds", "_weights", "_inverse", "_weighted", "_factor", "_loads")

    def __init__(
        self,
        servers: Sequence[S],
        name_of: Callable[[S], str],
        weight_of: Callable[[S], float] | None = None,
        factor: float = 1.25,
    ) -> None:
        """Raises ValueError on a factor under 1 (math.inf turns the bound off), a weight that is not
        positive and finite (leave such servers out), or two servers of one name."""
        if not factor >= 1:  # also refuses NaN
            raise ValueError(f"the balance factor must be at least 1, not {factor}")
        self._servers = list(servers)
        self._seeds = [_seed(name_of(server)) for server in self._servers]
        if len(set(self._seeds)) != len(self._seeds):
            raise ValueError("two servers share a name")
        self._weighted = weight_of is not None
        weights = [1.0] * len(self._servers) if weight_of is None else [float(weight_of(s)) for s in self._servers]
        for server, weight in zip(self._servers, weights, strict=True):
            if not 0 < weight < math.inf:
                raise ValueError(f"the weight of {name_of(server)!r} must be positive, not {weight}")
        self._weights = weights
        self._inverse = [1.0 / weight for weight in weights]
        self._factor = factor
        # Scratch space for pick(): each server's load, or None when not usable. Reused by every
        # pick (they never overlap: no await inside), so that a pick allocates no list.
        self._loads: list[int | None] = [None] * len(self._servers)

    def _score(self, hashed: int, index: int) -> float:
        mixed = _mix(hashed ^ self._seeds[index])
        if not self._weighted:
            return mixed
        # The top 52 bits as u in (0, 1), exactly (never 0 nor 1: ln would be -inf or 0); ln(u) / w
        # is negative, and the largest wins.
        return math.log(((mixed >> 12) + 0.5) * _UNIT52) * self._inverse[index]

    def order(self, key: bytes) -> list[S]:
        """All the servers, the best first, for `key` (for retries, and for tests)."""
        hashed = _key_hash(key)
        ranked = sorted(range(len(self._servers)), key=lambda index: self._score(hashed, index), reverse=True)
        return [self._servers[index] for index in ranked]

    def pick(self, key: bytes, usable: Callable[[S], bool], load: Callable[[S], int]) -> S | None:
        """The server for `key`: the first in its order that is usable and whose load is under the bound.

        The bound is counted over the usable servers only (a down server is no candidate and its
        load is nobody's share). With a factor of at least 1 and loads that are not negative, some
        usable server is always under the bound (their loads sum to less than their bounds). Should
        the loads still leave none (negative counts), the first usable server of the key's order
        gets it: a pick never returns None while a usable server exists.
        """
        servers = self._servers
        loads = self._loads
        weights = self._weights
        total = 0
        weight_sum = 0.0
        for index, server in enumerate(servers):
            if usable(server):
                current = load(server)
                loads[index] = current
                total += current
                weight_sum += weights[index]
            else:
                loads[index] = None
        if not weight_sum:
            return None
        # load < ceil(x) is load < x for an integer load: no ceil needed.
        limit = self._factor * (total + 1) / weight_sum
        hashed = _key_hash(key)
        seeds = self._seeds
        inverse = self._inverse if self._weighted else None
        best = -1
        best_score = 0.0
        for index, held in enumerate(loads):
            if held is None or held >= limit * weights[index]:
                continue
            # _mix(), inlined: a call per server would cost more than the mixing itself.
            value = hashed ^ seeds[index]
            value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
            value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
            value ^= value >> 31
            score: float = value if inverse is None else math.log(((value >> 12) + 0.5) * _UNIT52) * inverse[index]
            if best < 0 or score > best_score:
                best = index
                best_score = score
        if best < 0:  # every usable server at or over its bound: only with negative loads
            return self._first_usable(hashed, loads)
        return servers[best]

    def _first_usable(self, hashed: int, loads: list[int | None]) -> S | None:
        best = -1
        best_score = 0.0
        for index, current in enumerate(loads):
            if current is not None:
                score = self._score(hashed, index)
                if best < 0 or score > best_score:
                    best = index
                    best_score = score
        return self._servers[best] if best >= 0 else None


class Persistence(Generic[S]):
    """One pool's persistence at run time: its kind, the request's key, the cookie lines, counters.

    Built by the pool with its servers (and rebuilt with them on a reload); `selection.select` asks
    it. `key_of` reads the key as the head ends: the persistence cookie's value, taken out of the
    Cookie fields that go to the server (`fields` is the reader's flat list: name, b": ", value,
    CRLF, ...); the value of the configured header; or the client's address.
    """

    __slots__ = (
        "kind",
        "cookie",
        "pair",
        "header",
        "jar",
        "named",
        "ring",
        "lines",
        "hits",
        "misses",
        "redispatches",
        "key_of",
        "last",
        "remembered",
    )

    def __init__(
        self,
        kind: str,
        pool: str,
        servers: Sequence[S],
        name_of: Callable[[S], str],
        weight_of: Callable[[S], float],
        *,
        cookie: str = "LBSRV",
        max_age: int | None = None,
        header: str | None = None,
        balance: float = 1.25,
        secret: bytes = b"",
        remembered: int = REMEMBERED,
    ) -> None:
        self.kind = kind
        self.remembered = remembered  # the most keys `last` holds
        self.cookie = cookie.encode()
        self.pair = self.cookie + b"="  # how a Cookie field holding only ours begins
        self.header = header.lower().encode() if header is not None else b""
        self.jar: CookieJar[S] | None = None
        self.named: dict[bytes, S] = {}  # cookie value -> server: the jar's table, read by select's fast path
        self.ring: Rendezvous[S] | None = None
        # per server: its Set-Cookie line, plain and with Secure (a TLS listener's), made once here
        self.lines: dict[S, tuple[bytes, bytes]] = {}
        if kind == COOKIE:
            jar = CookieJar(pool, servers, name_of, secret)
            self.jar = jar
            self.named = {jar.value_for(server): server for server in servers}
            for server in servers:
                value = jar.value_for(server)
                self.lines[server] = (
                    set_cookie_field(self.cookie, value, max_age, secure=False),
                    set_cookie_field(self.cookie, value, max_age, secure=True),
                )
        else:
            self.ring = Rendezvous(servers, name_of, weight_of, balance)
        # counters, read at scrape time
        self.hits = 0  # a request whose key led to its server
        self.misses = 0  # no key, or a cookie naming no server of the pool
        self.redispatches = 0  # the key's server could not take it (down, disabled, failed on this request)
        # source_ip, header: the server each recent key last went to. A hash cannot tell a known user
        # from a new one; this can, so that a draining server keeps the users it has (`recall`).
        self.last: dict[bytes, S] = {}
        # The request's key, read as the head ends (the method for the kind, chosen once).
        self.key_of: Callable[[list[bytes], bytes], bytes | None] = (
            self._cookie if kind == COOKIE else self._client if kind == SOURCE_IP else self._header
        )

    def carry_on(self, previous: Persistence[S]) -> None:
        """Take the counters, and the keys' last servers, of the persistence this one replaces (a
        reload): counters only go up, and a reload does not forget who was on a draining server."""
        self.hits += previous.hits
        self.misses += previous.misses
        self.redispatches += previous.redispatches
        if self.ring is not None:
            self.last = previous.last

    def recall(self, key: bytes) -> S | None:
        """The server `key` last went to, if it is still remembered."""
        return self.last.get(key)

    def remember(self, key: bytes, server: S) -> None:
        """`key` went to `server`. The most recent `remembered` keys are kept; the oldest go first."""
        last = self.last
        if key not in last and len(last) >= self.remembered:
            del last[next(iter(last))]
        last[key] = server

    def _client(self, fields: list[bytes], client_ip: bytes) -> bytes | None:
        return client_ip

    def _header(self, fields: list[bytes], client_ip: bytes) -> bytes | None:
        return header_value(fields, self.header)

    def _cookie(self, fields: list[bytes], client_ip: bytes) -> bytes | None:
        """The persistence cookie's value, taken out of every Cookie field (a field left empty goes)."""
        at = -1
        for index in range(0, len(fields), 4):
            name = fields[index]
            if len(name) == 6 and name.lower() == b"cookie":
                if at >= 0:
                    return self._cookies(fields)  # several Cookie fields: rare, the long way
                at = index
        if at < 0:
            return None
        value = fields[at + 2]
        pair = self.pair
        if value.startswith(pair) and b";" not in value:  # ours alone in its field: the usual case
            del fields[at : at + 4]
            return value[len(pair) :].strip(_OWS)
        found, rest = find_cookie(value, self.cookie)
        if found is not None:
            if rest is None:
                del fields[at : at + 4]
            else:
                fields[at + 2] = rest
        return found

    def _cookies(self, fields: list[bytes]) -> bytes | None:
        found: bytes | None = None
        emptied: list[int] = []
        for index in range(0, len(fields), 4):
            name = fields[index]
            if len(name) != 6 or name.lower() != b"cookie":
                continue
            value, rest = find_cookie(fields[index + 2], self.cookie)
            if value is None:
                continue
            if found is None:
                found = value
            if rest is None:
                emptied.append(index)  # nothing else in that Cookie field: it goes
            else:
                fields[index + 2] = rest
        for index in reversed(emptied):
            del fields[index : index + 4]
        return found
