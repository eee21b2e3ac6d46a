"""Routes of an http listener: which pool a request goes to, or which 4xx it gets; no I/O.

A listener's routes are tried in the order written and the first that matches wins; a request that
no route matches goes to the listener's default pool (`RouteTable.pick` returns None). This module
owns the route model (`Match`, `RouteSpec`, as the config file writes them), their validation
(`check`), and the table built once from them (`RouteTable`, as Envoy's `RouteMatcher`: a dict of
exact hosts, then wildcard suffixes, then the host-less routes), consulted once per request. It
never sees a socket, a pool or the event loop: the runtime fills `Route.target`, the proxy acts on
the answer.

Hosts are compared as `host_key` makes them: lower-case, port and trailing dot removed. A leading
`*.` matches one or more labels: `*.example.com` matches `a.example.com` and `a.b.example.com`, never
`example.com`.

Paths are never matched on the raw request-target, so that a route, a deny above all, cannot be
walked around by spelling the same path another way (`normalize_path`): the query and fragment go;
percent-encoded unreserved characters are decoded and the hex of the other encodings upper-cased
(RFC 3986 §6.2.2.1-2), and `%2F` is decoded to `/` as well, since nginx decodes the whole path before
matching its locations and a server that decodes `%2F` would otherwise be reachable past a deny
(`/ServiceCenter%2Fa`); runs of slashes are merged (nginx's merge_slashes, for the same reason); dot
segments are removed (RFC 3986 §5.2.4; `..` above the root stays at `/`). Matching stays
case-sensitive, as HAProxy's path_beg. `path_regex` is searched anywhere in the normalized path
(`re.search`, as HAProxy's path_reg, so anchor it with `^` to match from the start); `(?i)` makes it
case-insensitive. Path conditions work on bytes: a regex is compiled from its UTF-8 encoding as a
bytes pattern (`\\w` and `(?i)` are ASCII-only), a prefix is its UTF-8 encoding, and since non-ASCII
characters arrive percent-encoded (RFC 3986 §2.1), they are written that way too (`/caf%C3%A9/`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Match:
    """The conditions of a route, all of which must hold; the empty match matches every request."""

    host: str | None = None  # "api.example.com" or "*.example.com", lower-cased by the parser
    path_prefix: tuple[str, ...] = ()  # any of them; empty: no constraint
    path_regex: str | None = None  # searched in the normalized path
    header: tuple[tuple[str, str | None], ...] = ()  # (lower-case name, exact value or None: present)
    methods: frozenset[str] | None = None  # exact, case-sensitive as HTTP methods are


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route as the config file writes it: where matching requests go, a pool or a deny."""

    name: str  # the `name:` key, else str(index)
    match: Match
    pool: str | None = None
    deny: int | None = None


class RouteError(ValueError):
    """A route that cannot be compiled; `index` is its place in the listener's list."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


# -- request side: the host and the path as routes see them --

# RFC 3986 §2.3: the characters a percent-encoding never needs to hide
_UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _percent_table() -> dict[bytes, bytes]:
    """Two hex digits, in either case -> what `%XX` becomes in a normalized path."""
    table: dict[bytes, bytes] = {}
    for byte in range(256):
        kept = bytes((byte,)) if byte in _UNRESERVED or byte == 0x2F else b"%%%02X" % byte
        digits = b"%02X" % byte
        high, low = digits[:1], digits[1:]
        for spelling in (digits, high.lower() + low, high + low.lower(), digits.lower()):
            table[spelling] = kept
    return table


_PERCENT: Final = _percent_table()
_SLASHES: Final = re.compile(rb"//+")
SEEN_HOSTS: Final = 1024  # Host values a route table remembers the candidates of


def host_key(host: bytes) -> bytes:
    """A Host value as routes compare it: lower-case, without its port and trailing dot."""
    if host[:1] == b"[":  # an IPv6 literal: its colons are not a port's
        end = host.find(b"]")
        if end >= 0:
            host = host[: end + 1]
    else:
        colon = host.find(b":")
        if colon >= 0:
            host = host[:colon]
    if host[-1:] == b".":
        host = host[:-1]
    return host.lower()


def normalize_path(target: bytes) -> bytes:
    """The path of a request-target as path conditions see it (the module docstring says why).

    Origin-form `/a/b?q` and absolute-form `http://host/a/b?q` give their path (an empty one `/`),
    asterisk-form `*` gives `*`. Anything else, which `framing.check_request` refuses before a route
    sees it, is returned as it is. Invalid percent-encodings (`%zz`, a `%` at the end) stay as they are.
    """
    if target[:1] == b"/":
        path = target
    elif target == b"*":
        return target
    else:
        _, sep, rest = target.partition(b"://")
        if not sep:
            return target
        start = len(rest)
        for delimiter in (b"/", b"?", b"#"):
            position = rest.find(delimiter)
            if 0 <= position < start:
                start = position
        path = rest[start:]
        if path[:1] != b"/":  # RFC 3986 §6.2.3: an empty path is "/"
            path = b"/" + path
    path = _without_query(path)
    # each step runs only when it can change something: most paths take none
    if b"%" in path:
        path = _percent_normalized(path)
    if b"//" in path:
        path = _SLASHES.sub(b"/", path)
    if b"/." in path:
        path = _remove_dot_segments(path)
    return path


def _percent_normalized(path: bytes) -> bytes:
    """RFC 3986 §6.2.2.1-2, and %2F decoded: split, not a regex with a callback, and nothing decoded twice."""
    pieces = path.split(b"%")
    parts = [pieces[0]]
    for piece in pieces[1:]:
        decoded = _PERCENT.get(piece[:2])
        if decoded is None:
            parts += (b"%", piece)
        else:
            parts += (decoded, piece[2:])
    return b"".join(parts)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 for a path that starts with `/`, slashes merged."""
    segments = path.split(b"/")
    kept: list[bytes] = []
    for segment in segments[1:]:
        if segment == b"..":
            if kept:
                kept.pop()
        elif segment != b".":
            kept.append(segment)
    if segments[-1] in (b".", b".."):  # "/a/b/.." is "/a/": the last segment is a directory
        kept.append(b"")
    return b"/" + b"/".join(kept)


def _without_query(path: bytes) -> bytes:
    """`path` up to its query or fragment, if any."""
    for delimiter in (b"?", b"#"):
        position = path.find(delimiter)
        if position >= 0:
            path = path[:position]
    return path


def _normal_prefix(prefix: bytes) -> bytes:
    """What `prefix` would be after the normalization a path goes through (dot segments aside)."""
    prefix = _without_query(prefix)
    if b"%" in prefix:
        prefix = _percent_normalized(prefix)
    return _SLASHES.sub(b"/", prefix)


# -- config side: a route's host pattern --


def _host_pattern(host: str) -> tuple[bool, bytes]:
    """(is a wildcard, key): the key of `*.example.com` is `example.com`, the suffix it stands for."""
    if host.startswith("*."):
        return True, host_key(host[2:].encode())
    return False, host_key(host.encode())


def _wildcard_matches(suffix: bytes, host: bytes) -> bool:
    """Whether `*.suffix` matches `host` (both keys): one or more labels before the suffix."""
    return host.endswith(b"." + suffix) and len(host) > len(suffix) + 1


def _suffixes(name: bytes, start: int) -> Iterable[bytes]:
    """What follows each dot of `name` at or after `start`, longest first."""
    dot = name.find(b".", start)
    while dot >= 0:
        yield name[dot + 1 :]
        dot = name.find(b".", dot + 1)


# -- the runtime table --


class Route:
    """One route at run time: what `pick` answers, with the counter the proxy keeps for it.

    The compiled conditions (`methods`, `headers`, `prefixes`, `regex`) are `pick`'s; the host
    condition lives in the table's index, not here.
    """

    __slots__ = (
        "index",
        "name",
        "pool_name",
        "deny",
        "requests",
        "target",
        "spec",
        "methods",
        "headers",
        "prefixes",
        "regex",
        "needs_path",
    )

    def __init__(self, index: int, spec: RouteSpec) -> None:
        """Raises `re.error` for an invalid path_regex."""
        match = spec.match
        self.index = index
        self.name = spec.name
        self.pool_name = spec.pool
        self.deny = spec.deny
        self.requests = 0  # counted by the proxy
        self.target: object = None  # the Pool, filled by the runtime
        self.spec = spec
        self.methods = None if match.methods is None else frozenset(m.encode() for m in match.methods)
        self.headers = tuple((name.lower().encode(), None if v is None else v.encode()) for name, v in match.header)
        self.prefixes = tuple(prefix.encode() for prefix in match.path_prefix)
        self.regex = None if match.path_regex is None else re.compile(match.path_regex.encode())
        self.needs_path = bool(self.prefixes) or self.regex is not None

    def __repr__(self) -> str:
        return f"<Route {self.index} {self.name!r}>"


def _headers_hold(conditions: tuple[tuple[bytes, bytes | None], ...], fields: list[bytes]) -> bool:
    """Whether every (lower-case name, value or None) condition holds in the flat field list."""
    for name, value in conditions:
        size = len(name)
        for index in range(0, len(fields), 4):
            field = fields[index]
            # lengths first: most fields are skipped without lower-casing them
            if len(field) == size and field.lower() == name and (value is None or fields[index + 2] == value):
                break
        else:
            return False
    return True


def _merged(groups: Iterable[Iterable[Route]]) -> tuple[Route, ...]:
    """Routes from several index entries in the order written, which is what first-match follows."""
    return tuple(sorted((route for group in groups for route in group), key=lambda route: route.index))


class RouteTable:
    """A listener's routes, compiled once (per config load) for `pick`, called once per request.

    Every route is indexed by its host condition: an exact host, a wildcard suffix, or none. Each
    exact host and each wildcard suffix gets, at build time, every route that can match a host it
    stands for (its own, the wildcards above it, the host-less ones) merged in the order written. So
    `pick` makes one dict lookup for a known host, one per label for another, and then checks the
    other conditions of those candidates only, first match winning.
    """

    __slots__ = ("routes", "_exact", "_wildcards", "_any", "_by_host", "_seen")

    def __init__(self, specs: Sequence[RouteSpec]) -> None:
        routes = []
        for index, spec in enumerate(specs):
            try:
                routes.append(Route(index, spec))
            except re.error as error:
                raise RouteError(index, f"{_label(index, spec)}: invalid path_regex: {error}") from None
        self.routes = tuple(routes)
        exact: dict[bytes, list[Route]] = {}
        wildcards: dict[bytes, list[Route]] = {}
        anywhere: list[Route] = []
        for route in self.routes:
            host = route.spec.match.host
            if host is None:
                anywhere.append(route)
            else:
                wildcard, key = _host_pattern(host)
                (wildcards if wildcard else exact).setdefault(key, []).append(route)
        self._any = tuple(anywhere)
        self._by_host = bool(exact or wildcards)  # else pick need not look at the host at all
        # A host `x.s` whose longest wildcard suffix is `s` is matched by the wildcards of `s` and of
        # every suffix of `s`, whatever `x` is: the candidates of `s` are fixed at build time.
        self._wildcards = {
            key: _merged([own, anywhere, *(wildcards.get(suffix, ()) for suffix in _suffixes(key, 0))])
            for key, own in wildcards.items()
        }
        self._exact = {
            key: _merged([own, anywhere, *(wildcards.get(suffix, ()) for suffix in _suffixes(key, 1))])
            for key, own in exact.items()
        }
        # Host values as received -> their candidates: clients repeat one Host on every request, so
        # the common pick is one dict lookup. Bounded: emptied when full (a client that sends a
        # new Host each time costs what it would without it).
        self._seen: dict[bytes, tuple[Route, ...]] = {}

    def pick(self, method: bytes, target: bytes, host: bytes | None, fields: list[bytes]) -> Route | None:
        """The first route that matches, or None (the listener's default pool).

        `host` is the Host value as received (it may carry a port, it may be None), `fields` the
        flat field list of `request_head.RequestReader` (name, b": ", value, CRLF, name, ...).
        """
        candidates = self._any
        if self._by_host and host is not None:
            seen = self._seen.get(host)
            candidates = seen if seen is not None else self._candidates(host)
        path: bytes | None = None  # normalized at most once, and only for a route that needs it
        for route in candidates:
            methods = route.methods
            if methods is not None and method not in methods:
                continue
            if route.headers and not _headers_hold(route.headers, fields):
                continue
            if route.needs_path:
                if path is None:
                    path = normalize_path(target)
                if route.prefixes and not path.startswith(route.prefixes):
                    continue
                regex = route.regex
                if regex is not None and regex.search(path) is None:
                    continue
            return route
        return None

    def _candidates(self, host: bytes) -> tuple[Route, ...]:
        """The routes a request with this Host value may match, in order; remembered for the next one."""
        key = host_key(host)
        found = self._exact.get(key)
        if found is None and self._wildcards:
            # longest suffix first; a label before it is required, hence the search from 1
            dot = key.find(b".", 1)
            while dot >= 0:
                found = self._wildcards.get(key[dot + 1 :])
                if found is not None:
                    break
                dot = key.find(b".", dot + 1)
        candidates = found if found is not None else self._any
        seen = self._seen
        if len(seen) >= SEEN_HOSTS:
            seen.clear()
        seen[host] = candidates
        return candidates


# -- validation --


def _label(index: int, spec: RouteSpec) -> str:
    return f"route {index}" if spec.name == str(index) else f"route {index} ({spec.name})"


def _host_implies(earlier: str | None, later: str | None) -> bool:
    """Whether every host `later` matches is matched by `earlier` too."""
    if earlier is None:
        return True
    if later is None:
        return False
    wild_earlier, key_earlier = _host_pattern(earlier)
    wild_later, key_later = _host_pattern(later)
    if (wild_earlier, key_earlier) == (wild_later, key_later):
        return True
    if not wild_earlier:
        return False
    # `*.s` covers an exact host below s, and a narrower wildcard `*.t.s`
    return key_later.endswith(b"." + key_earlier) if wild_later else _wildcard_matches(key_earlier, key_later)


def _implies(earlier: Match, later: Match) -> bool:
    """Whether every request `later` matches is matched by `earlier`: then `earlier` always wins.

    Sound, not complete: a True is a proof, a False may miss a shadow that only reasoning about
    regexes would find.
    """
    if not _host_implies(earlier.host, later.host):
        return False
    if earlier.path_prefix:
        earlier_prefixes = tuple(_normal_prefix(p.encode()) for p in earlier.path_prefix)
        if not later.path_prefix or not all(
            _normal_prefix(p.encode()).startswith(earlier_prefixes) for p in later.path_prefix
        ):
            return False
    if earlier.path_regex is not None and earlier.path_regex != later.path_regex:
        return False
    later_names = {name for name, _ in later.header}
    for name, value in earlier.header:
        if (name, value) not in later.header and not (value is None and name in later_names):
            return False
    return earlier.methods is None or (later.methods is not None and later.methods <= earlier.methods)


def _spec_errors(index: int, spec: RouteSpec) -> list[str]:
    """What is wrong with one route on its own."""
    label = _label(index, spec)
    match = spec.match
    errors = []
    if spec.pool is None and spec.deny is None:
        errors.append(f"{label}: has neither pool nor deny")
    elif spec.pool is not None and spec.deny is not None:
        errors.append(f"{label}: has both pool and deny (one of them)")
    if spec.deny is not None and not 400 <= spec.deny <= 499:
        errors.append(f"{label}: deny must be a 4xx status (400-499), not {spec.deny}")
    if match.path_regex is not None:
        try:
            re.compile(match.path_regex.encode())
        except re.error as error:
            errors.append(f"{label}: invalid path_regex {match.path_regex!r}: {error}")
    host = match.host
    if host is not None and (not host.removeprefix("*.") or "*" in host.removeprefix("*.")):
        errors.append(f"{label}: host {host!r} is neither a name nor a leading '*.' wildcard")
    for prefix in match.path_prefix:
        # a deny whose prefix no normalized path can start with would deny nothing, silently
        normal = _normal_prefix(prefix.encode())
        if not prefix.startswith(("/", "*")):
            errors.append(f"{label}: path_prefix {prefix!r} never matches: a path starts with '/'")
        elif normal != prefix.encode():
            errors.append(f"{label}: path_prefix {prefix!r} never matches a normalized path: write {normal.decode()!r}")
    return errors


def check(specs: Sequence[RouteSpec]) -> list[str]:
    """Errors of a route list, each naming the route(s); empty when the list can be used.

    Invalid regexes, a deny that is not a 4xx, a route with both or neither of pool and deny, a
    malformed host pattern, a path_prefix that no normalized path can start with, a name used twice,
    and every route that can never match because an earlier one always matches first. Whether the
    pools exist is the caller's to check (the config knows them).
    """
    errors: list[str] = []
    names: dict[str, int] = {}
    for index, spec in enumerate(specs):
        errors += _spec_errors(index, spec)
        first = names.setdefault(spec.name, index)
        if first != index:
            errors.append(f"{_label(index, spec)}: the name {spec.name!r} is already route {first}'s")
        for earlier in range(index):
            if _implies(specs[earlier].match, spec.match):
                errors.append(
                    f"{_label(index, spec)} can never match: {_label(earlier, specs[earlier])} matches every"
                    " request it would match first"
                )
                break
    return errors
