"""The configuration file: YAML in, frozen dataclasses out.

This module owns the schema, `${ENV}` interpolation, defaults and validation, and the error messages
that name the file, the line and the key path (`lbproxy.yaml:14: pools.farm.servers[2].address: ...`).
It reads the YAML node tree rather than plain Python values so that every value keeps its line.
It must not touch sockets, the event loop or runtime state: the runtime builds its objects from a
`Config`, never the other way round. The one lookup it makes is `resolve`, a server name through the
system resolver: the runtime calls it at start and on reload, and `load(resolve=True)` (what
`lbproxy check` does) calls it for every server so that a name that would stop `run` is an error here.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import math
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypeVar

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError
from yaml.resolver import Resolver

from lbproxy import routing, tls
from lbproxy.routing import Match, RouteSpec
from lbproxy.tls import Certificate

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

Mode = Literal["http", "tcp"]
PolicyName = Literal["round_robin", "least_connections", "ratio", "dynamic_ratio"]
HealthType = Literal["http", "tcp", "none"]

MODES: Final = ("http", "tcp")
POLICIES: Final = ("round_robin", "least_connections", "ratio", "dynamic_ratio")
HEALTH_TYPES: Final = ("http", "tcp", "none")
EXPIRY_WARNING: Final = datetime.timedelta(days=14)  # a listener certificate closer to its end is warned of
MAX_RATIO: Final = 256  # as HAProxy's weight: enough range, and keeps weighted schedules small


@dataclass(frozen=True, slots=True)
class Address:
    """A HOST:PORT pair as written; a server's host name is looked up by `resolve`."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_ADMIN_BIND: Final = Address("127.0.0.1", 9090)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    bind: Address = DEFAULT_ADMIN_BIND
    token: str | None = None


@dataclass(frozen=True, slots=True)
class TlsConfig:
    certificates: tuple[Certificate, ...]  # read from their files; the first is the default (no SNI)
    min_version: str = "TLSv1.2"
    ciphers: str | None = None  # OpenSSL syntax, TLS 1.2 only
    client_ca: Path | None = None  # mutual TLS: a client certificate from this CA is required


@dataclass(frozen=True, slots=True)
class ListenerTimeouts:
    request_header: float = 10.0  # first byte to end of headers: stops slowloris
    keepalive: float = 60.0  # idle client connection between requests
    request_body: float = 300.0  # deadline for a whole request body, however slowly it trickles
    tunnel: float = 3600.0  # an upgraded connection (WebSocket) with no byte either way: closed


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    header_size: int = 64 * 1024
    header_count: int = 100
    target_size: int = 16 * 1024
    max_body_size: int | None = None  # None: unlimited


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """A token bucket per client: `rate` requests a second, up to `burst` at once."""

    rate: float  # requests a second
    burst: int
    header: str | None = None  # key: this header's value; None: the client's address (source_ip)
    status: int = 429
    max_clients: int = 100_000  # the most clients remembered; the least recently seen is forgotten


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    pool: str
    mode: Mode = "http"
    maintenance_page: Path | None = None
    redirect_https: int | None = None  # a plain listener that answers every request 308 to https
    retry_after: float = 30.0
    forwarded_headers: bool = True
    max_connections: int = 10_000
    tls: TlsConfig | None = None
    access_log: str | None = None  # "-" for standard output, else a file path
    timeouts: ListenerTimeouts = ListenerTimeouts()
    limits: ListenerLimits = ListenerLimits()
    accept_proxy: bool = False  # a PROXY header (v1 or v2) opens every connection
    idle_timeout: float = 3600.0  # tcp: a connection with no byte either way for this long is closed
    routes: tuple[RouteSpec, ...] = ()  # http: first match wins; no match: `pool`
    rate_limit: RateLimitConfig | None = None  # http
    trusted_proxies: tuple[IPNetwork, ...] = ()  # whose X-Forwarded-For may name the client


@dataclass(frozen=True, slots=True)
class HealthConfig:
    type: HealthType = "none"
    path: str = "/"
    method: str = "GET"
    host: str | None = None  # the Host header of http probes; None: the server's address
    expect_status: tuple[int, int] = (200, 399)
    expect_body: str | None = None  # a substring the probe response body must contain
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    # The state before the first probes. Unset: up at process start (as HAProxy), but down for a
    # server a reload adds, so that it earns its traffic with a successful probe.
    start: Literal["up", "down"] | None = None


@dataclass(frozen=True, slots=True)
class PassiveConfig:
    consecutive_failures: int = 3  # connect failures, resets and timeouts seen by real traffic
    on_5xx: bool = False  # count 5xx responses as failures too


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    address: Address
    ratio: int = 1
    backup: bool = False
    max_connections: int | None = None  # requests (http) or connections (tcp) at once; None: no limit


@dataclass(frozen=True, slots=True)
class PoolTimeouts:
    connect: float = 5.0
    response: float = 60.0  # waiting for the server: request sent to first byte, and between bytes


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    max_idle: int = 256  # idle connections kept per server: above the usual concurrency
    idle_timeout: float = 30.0  # below the usual server keep-alive timeouts, so we close first


@dataclass(frozen=True, slots=True)
class PoolTlsConfig:
    """TLS from lbproxy to the pool's servers (and its HTTP probes)."""

    verify: bool = True  # the server's certificate must be valid for server_name
    ca: Path | None = None  # None: the system's CAs
    server_name: str | None = None  # SNI and the name verified; None: each server's host as written
    client_cert: Path | None = None  # lbproxy's own certificate, for servers that ask for one
    client_key: Path | None = None
    client_expiry: datetime.datetime | None = None  # read from client_cert


PersistenceType = Literal["cookie", "source_ip", "header"]


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Where requests wait when every server they may go to is at its max_connections."""

    max_size: int = 1000  # requests waiting, pool-wide; over it: 503 at once
    timeout: float = 5.0  # a request that waited this long: 503


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    """A second copy of a slow idempotent request, to another server (hedging.py)."""

    after: float | None = 0.2  # seconds without a response byte; None: the pool's p99, with `floor`
    floor: float = 0.05  # the least `after` can be in p99 mode
    max_extra: float = 0.1  # at most this share of requests hedged


@dataclass(frozen=True, slots=True)
class PersistenceConfig:
    type: PersistenceType
    cookie: str = "LBSRV"  # type cookie: the cookie lbproxy inserts
    max_age: float | None = None  # None: a session cookie
    header: str | None = None  # type header: the request header whose value is the key
    balance: float = 1.25  # source_ip, header: no server takes more than this times the average load
    secret: str = ""  # mixed into the cookie values, so that they cannot be computed from the names


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    policy: PolicyName = "round_robin"
    retries: int = 2
    backup_pool: str | None = None
    health: HealthConfig = HealthConfig()
    timeouts: PoolTimeouts = PoolTimeouts()
    keepalive: KeepaliveConfig = KeepaliveConfig()
    passive: PassiveConfig | None = None  # None: no passive detection
    send_proxy: Literal["v1", "v2"] | None = None  # tcp: a PROXY header ahead of each connection
    min_up: int = 1  # fewer available primaries than this: the backups join in
    max_down_fraction: float | None = None  # the depool guard; None: off
    slow_start: float | None = None  # seconds over which a server coming up ramps to full share
    disable_grace: float = 10.0  # after `disable`, what is still in flight is cut after this
    persistence: PersistenceConfig | None = None
    tls: PoolTlsConfig | None = None  # None: plain HTTP (or TCP) to the servers
    queue: QueueConfig = QueueConfig()  # used when a server has max_connections
    hedge: HedgeConfig | None = None  # http: None, no hedging


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The fleet this node belongs to (cluster.py): its name, and the etcd that holds the fleet."""

    node: str
    endpoints: tuple[str, ...]
    prefix: str = "/lbproxy/"  # every key lbproxy writes lives under it
    tls: PoolTlsConfig | None = None  # https endpoints: the CA, and lbproxy's client certificate if etcd asks
    username: str | None = None  # etcd's authentication, with password (both or neither)
    password: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    listeners: tuple[ListenerConfig, ...]
    pools: Mapping[str, PoolConfig]
    admin: AdminConfig | None = None  # None: no admin server (the `admin` block is absent)
    state_file: Path | None = None  # drained and disabled servers, kept across restarts
    shutdown_timeout: float = 30.0  # on SIGTERM: how long in-flight requests may take to finish
    log_format: Literal["plain", "json"] = "plain"  # lbproxy's own events, one line each
    cluster: ClusterConfig | None = None  # None: this node is on its own

    def summary(self) -> str:
        servers = sum(len(pool.servers) for pool in self.pools.values())
        lines = [
            f"{self.path}: OK: {_plural(len(self.listeners), 'listener')}, "
            f"{_plural(len(self.pools), 'pool')}, {_plural(servers, 'server')}"
        ]
        lines += (f"{self.path}: warning: {warning}" for warning in self.warnings())
        return "\n".join(lines)

    def warnings(self, now: datetime.datetime | None = None) -> list[str]:
        """What is allowed but risky: `lbproxy check` prints it, and the runtime logs it at start and reload."""
        found = [
            f"pools.{name}.tls.verify: false: the servers' certificates are not checked"
            for name, pool in self.pools.items()
            if pool.tls is not None and not pool.tls.verify
        ]
        now = now or datetime.datetime.now(datetime.UTC)
        for name, pool in self.pools.items():
            settings = pool.tls
            expiry = settings.client_expiry if settings is not None else None
            if settings is not None and expiry is not None and expiry - now < EXPIRY_WARNING:
                found.append(
                    f"pools.{name}.tls: {settings.client_cert} expires on "
                    f"{expiry:%Y-%m-%d %H:%M} UTC, in {(expiry - now).days} days"
                )
        for index, listener in enumerate(self.listeners):
            for certificate in listener.tls.certificates if listener.tls is not None else ():
                left = certificate.not_after - now
                if left < EXPIRY_WARNING:
                    found.append(
                        f"listeners[{index}].tls: {certificate.cert} expires on "
                        f"{certificate.not_after:%Y-%m-%d %H:%M} UTC, in {left.days} days"
                    )
        return found


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file, located by line and key path."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        if not self.line:  # the file itself (it cannot be read): the message names it
            return self.message
        where = f"{self.key}: " if self.key else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class ConfigError(Exception):
    """A config file that cannot be used; `problems` lists every error found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: p.line)
        super().__init__("\n".join(str(p) for p in self.problems))


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, resolve: bool = False) -> Config:
    """Read, interpolate and validate the config file at `path`; raise ConfigError listing all errors.

    `resolve`: also look up every server's host name (with `resolve`), as `lbproxy check` does.
    """
    shown = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(shown, 0, "", f"cannot read {shown}: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"the file is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be read as UTF-8"
        raise ConfigError([Problem(shown, line, "", message)]) from None
    return parse(text, shown, os.environ if environ is None else environ, resolve=resolve)


def parse(text: str, filename: str, environ: Mapping[str, str], *, resolve: bool = False) -> Config:
    """Validate YAML `text`; `filename` is used in messages and to resolve relative paths."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line, message = _yaml_problem(exc, text.splitlines())
        raise ConfigError([Problem(filename, line, "", f"invalid YAML: {message}")]) from None
    except ReaderError as exc:  # a character YAML does not allow anywhere
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = f"invalid YAML: the control character #x{exc.character:04x} (column {column}) is not allowed"
        raise ConfigError([Problem(filename, line, "", message)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(filename, 1, "", f"invalid YAML: {exc}")]) from None
    reader = _Reader(filename, environ, resolve)
    if root is None:
        reader.problem(None, "", "the file is empty: it needs 'listeners' and 'pools'")
        raise ConfigError(reader.problems)
    config = reader.config(root)
    if reader.problems or config is None:
        raise ConfigError(reader.problems)
    return config


# -- YAML syntax errors in words -------------------------------------------------------------------

_FLOW_ERROR = re.compile(r"expected ',' or '([\]}])', but got (.*)")
_KEY_LINE = re.compile(r"\s*(?:- +)?[^\s#'\"][^#]*?:(?:\s|$)")  # `key:` or `- key:`, value or not


def _yaml_problem(error: yaml.MarkedYAMLError, lines: list[str]) -> tuple[int, str]:
    """The line of a YAML syntax error and what is wrong there, in words rather than the parser's.

    Covers the mistakes people make by hand: indentation, tabs, a missing or a second ':', a list item
    at the wrong level, an unclosed quote or bracket. Anything else keeps PyYAML's words.
    """
    problem, context = error.problem or "", error.context or ""
    mark = error.problem_mark or error.context_mark
    line = mark.line + 1 if mark is not None else 1
    column = mark.column + 1 if mark is not None else 1
    opened = error.context_mark  # where the quote, bracket, key or block being read began
    text = lines[line - 1] if line <= len(lines) else ""
    if problem == "found character '\\t' that cannot start any token":
        if not text[: column - 1].strip():
            return line, f"this line is indented with a tab (column {column}): YAML indents with spaces only"
        return line, f"a tab character in column {column}: YAML takes spaces here, not tabs"
    if problem.startswith("found character ") and problem.endswith(" that cannot start any token"):
        char = problem.removeprefix("found character ").removesuffix(" that cannot start any token")
        return line, f"a value cannot start with {char} (column {column}): put the value in quotes"
    if problem.startswith("expected the node content, but found "):
        found = problem.removeprefix("expected the node content, but found ")
        if found == "'-'" and context == "while parsing a flow node":
            return line, "a '- ' list item inside [...] or {...}: separate their items with ',' instead"
        return line, f"a value was expected in column {column}, not {found} (quote a value that starts with it)"
    if problem == "mapping values are not allowed here":
        if re.search(r":(?:\s|$)", text[: column - 1]):
            return line, f"a second ': ' on this line (column {column}): put a value that contains ': ' in quotes"
        above = next((n for n in range(line - 1, 0, -1) if lines[n - 1].strip()[:1] not in ("", "#")), None)
        if above is not None and not _KEY_LINE.match(lines[above - 1]):
            return line, f"line {above} has no ':' after its key, so this line continues it; add the ':' there"
        return line, "this line is indented more than the key above it, so it continues that key's value"
    if problem == "could not find expected ':'" and opened is not None:
        return opened.line + 1, "this line has no ': ' between its key and its value (write `key: value`)"
    if problem == "sequence entries are not allowed here":
        return line, f"a list item ('- ', column {column}) cannot start on its key's line: put it on the next line"
    if problem.startswith("expected <block end>, but found "):
        found = problem.removeprefix("expected <block end>, but found ")
        if found == "'-'":
            return line, (
                "a list item ('-') where a mapping key was expected; check the indentation "
                "(the items of one list start in the same column)"
            )
        if found == "'<scalar>'" and text[: column - 1].strip():
            return line, f"unexpected text after the value (column {column}): put the whole value in quotes"
        return line, "the indentation of this line does not match the lines above it"
    flow = _FLOW_ERROR.fullmatch(problem)
    if flow is not None and opened is not None:
        closer = flow.group(1)
        opener, what = ("[", "list") if closer == "]" else ("{", "mapping")
        if flow.group(2) == "'<stream end>'":
            return opened.line + 1, f"the '{opener}' in column {opened.column + 1} is never closed with '{closer}'"
        return line, (
            f"expected ',' or '{closer}' in column {column}: the {what} opened with '{opener}' on line "
            f"{opened.line + 1} is not closed, or two of its items have no ',' between them"
        )
    if context == "while scanning a quoted scalar" and opened is not None:
        text = lines[opened.line] if opened.line < len(lines) else ""
        quote = text[opened.column : opened.column + 1] or '"'
        return opened.line + 1, f"the quote {quote} in column {opened.column + 1} is never closed"
    if problem.startswith("found unknown escape character "):
        char = problem.removeprefix("found unknown escape character ").strip("'")
        return line, (
            f"'\\{char}' is not an escape sequence in a double-quoted value (column {column - 1}): "
            "use single quotes around a value with backslashes"
        )
    if problem.startswith("found undefined alias "):
        name = problem.removeprefix("found undefined alias ").strip("'")
        return line, f"the alias *{name} refers to no anchor: define &{name} before it"
    if context == "expected a single document in the stream":
        return line, "a second YAML document starts here: a config file holds one"
    if context.startswith("found duplicate anchor ") and opened is not None:
        name = context.removeprefix("found duplicate anchor ").split("'")[1]
        return line, f"the anchor &{name} is defined a second time (first on line {opened.line + 1})"
    return line, problem or context


# -- validation -------------------------------------------------------------------------------------

_MERGE: Final = "tag:yaml.org,2002:merge"
_WILDCARDS: Final = ("", "0.0.0.0", "::", "*")
# The keys each place in the file takes, the places named as the docs' headings name them. The reader
# checks every mapping against its place, and an unknown key is looked up here in the other places to
# say where it belongs ("unknown key 'retries' here; it belongs under pools.<name>").
_TOP: Final = "the top level"
_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    _TOP: ("admin", "listeners", "pools", "state_file", "shutdown_timeout", "log_format", "cluster"),
    "cluster": ("node", "etcd"),
    "cluster.etcd": ("endpoints", "prefix", "tls", "username", "password"),
    "cluster.etcd.tls": ("ca", "cert", "key"),
    "admin": ("bind", "token"),
    "listeners[]": (
        "name",
        "mode",
        "bind",
        "pool",
        "maintenance_page",
        "retry_after",
        "forwarded_headers",
        "max_connections",
        "tls",
        "access_log",
        "timeouts",
        "limits",
        "accept_proxy",
        "idle_timeout",
        "routes",
        "redirect_https",
        "rate_limit",
        "trusted_proxies",
    ),
    "listeners[].rate_limit": ("requests", "burst", "key", "status", "max_clients"),
    "listeners[].routes[]": ("name", "match", "pool", "deny"),
    "listeners[].routes[].match": ("host", "path_prefix", "path_regex", "header", "methods"),
    "listeners[].timeouts": ("request_header", "keepalive", "request_body", "tunnel"),
    "listeners[].limits": ("header_size", "header_count", "target_size", "max_body_size"),
    "listeners[].tls": ("cert", "key", "certificates", "min_version", "ciphers", "client_ca"),
    "listeners[].tls.certificates[]": ("cert", "key"),
    "pools.<name>": (
        "policy",
        "retries",
        "backup_pool",
        "servers",
        "health",
        "timeouts",
        "keepalive",
        "passive",
        "min_up",
        "max_down_fraction",
        "slow_start",
        "disable_grace",
        "send_proxy",
        "persistence",
        "tls",
        "queue",
        "hedge",
    ),
    "pools.<name>.queue": ("max_size", "timeout"),
    "pools.<name>.hedge": ("after", "floor", "max_extra"),
    "pools.<name>.tls": ("verify", "ca", "server_name", "client_cert", "client_key"),
    "pools.<name>.persistence": ("type", "cookie", "max_age", "header", "balance", "secret"),
    "pools.<name>.servers[]": ("name", "address", "ratio", "backup", "max_connections"),
    "pools.<name>.health": (
        "type",
        "path",
        "method",
        "host",
        "expect_status",
        "expect_body",
        "interval",
        "timeout",
        "rise",
        "fall",
        "start",
    ),
    "pools.<name>.passive": ("consecutive_failures", "on_5xx"),
    "pools.<name>.timeouts": ("connect", "response"),
    "pools.<name>.keepalive": ("max_idle", "idle_timeout"),
}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|m|g)?")
_SIZE_UNITS: Final = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "k": 1024,
    "MiB": 1024**2,
    "m": 1024**2,
    "GiB": 1024**3,
    "g": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.?"
)

T = TypeVar("T")


class _Invalid(Exception):
    """A value that failed its check; the message is recorded at the value's line."""


class _Reader:
    """Walks the YAML node tree, recording every problem instead of stopping at the first."""

    def __init__(self, filename: str, environ: Mapping[str, str], resolve: bool = False) -> None:
        self.filename = filename
        self.base = Path(filename).resolve().parent
        self.environ = environ
        self.resolve = resolve  # look up server names (`lbproxy check`)
        self._lookups: dict[str, str | None] = {}  # host name: why it does not resolve, or None
        self.problems: list[Problem] = []
        self._constructor = SafeConstructor()
        self._resolver = Resolver()

    def problem(self, node: Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(Problem(self.filename, line, key, message))

    # -- structure --

    def mapping(
        self, node: Node, key: str, place: str | None, required: tuple[str, ...] = ()
    ) -> dict[str, Node] | None:
        """The entries of a mapping node, with unknown, duplicate and missing keys reported.

        `place` names the node's keys in `_KEYS`; None admits any string key: the pools mapping is
        keyed by the user's names.
        """
        if not isinstance(node, MappingNode):
            self.problem(node, key, f"expected a mapping, got {self._shown(node)}")
            return None
        own = {id(key_node) for key_node, _ in node.value if key_node.tag != _MERGE}
        self._constructor.flatten_mapping(node)  # honours YAML merge keys (<<: *anchor)
        entries: dict[str, Node] = {}
        merged: set[str] = set()
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, ScalarNode) else None
            where = _join(key, str(name))
            if name is None or (place is not None and name not in _KEYS[place]):
                self.problem(key_node, where, _unknown_key(name, place))
            elif name in entries and name not in merged and id(key_node) in own:
                self.problem(key_node, where, "duplicate key")
            else:
                # flatten_mapping puts merged pairs first: a mapping's own keys override them
                entries[name] = value_node
                if id(key_node) in own:
                    merged.discard(name)
                else:
                    merged.add(name)
        for name in required:
            if name not in entries:
                self.problem(node, key, f"missing required key '{name}'")
        return entries

    def sequence(self, node: Node, key: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.problem(node, key, f"expected a list, got {self._shown(node)}")
            return None
        return list(node.value)

    def scalar(self, node: Node, key: str) -> object:
        """The Python value of a scalar node after `${VAR}` interpolation; raises _Invalid."""
        if not isinstance(node, ScalarNode):
            raise _Invalid(f"expected a single value, got a {'list' if isinstance(node, SequenceNode) else 'mapping'}")
        if "${" in node.value:
            node = self._interpolate(node)
        try:
            return self._constructor.construct_object(node, deep=True)
        except ConstructorError as exc:
            raise _Invalid(str(exc.problem)) from None

    def _interpolate(self, node: ScalarNode) -> ScalarNode:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            raise _Invalid(f"environment variable {name} is not set")

        value = _ENV.sub(substitute, node.value)
        # A plain scalar is typed after substitution, so `port: ${PORT}` gives an int.
        tag = node.tag
        if node.style is None:
            tag = self._resolver.resolve(ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
        return ScalarNode(tag, value, node.start_mark, node.end_mark, node.style)

    def value(self, entries: dict[str, Node], name: str, key: str, check: Callable[[object], T], default: T) -> T:
        """`check(entries[name])` with problems recorded at the value's line, or `default` if absent or bad."""
        node = entries.get(name)
        if node is None:
            return default
        where = _join(key, name)
        try:
            return check(self.scalar(node, where))
        except _Invalid as exc:
            self.problem(node, where, str(exc))
            return default

    def _shown(self, node: Node) -> str:
        if isinstance(node, ScalarNode):
            return repr(node.value)
        return "a list" if isinstance(node, SequenceNode) else "a mapping"

    # -- the schema --

    def config(self, root: Node) -> Config | None:
        entries = self.mapping(root, "", _TOP, ("listeners", "pools"))
        if entries is None:
            return None
        admin = self.admin(entries["admin"]) if "admin" in entries else None
        pools: dict[str, PoolConfig] = {}
        pool_nodes: dict[str, Node] = {}
        if "pools" in entries:
            pool_entries = self.mapping(entries["pools"], "pools", None)
            for name, node in (pool_entries or {}).items():
                if not _NAME.fullmatch(name):
                    self.problem(node, _join("pools", name), _bad_name(name))
                pool = self.pool(node, name)
                if pool is not None:
                    pools[name] = pool
                    pool_nodes[name] = node
        listeners = self.listeners(entries["listeners"], pools) if "listeners" in entries else ()
        if admin is not None and admin.bind.port:
            for listener in listeners:
                if _same_socket(admin.bind, listener.bind):
                    where = _entry(entries["admin"], "bind")
                    self.problem(where, "admin.bind", f"{admin.bind} is already bound by listener '{listener.name}'")
        self.check_backup_pools(pools, pool_nodes)
        state_file = self.value(entries, "state_file", "", self._writable_path, None)
        shutdown_timeout = self.value(entries, "shutdown_timeout", "", _duration, 30.0)
        log_format = self.value(entries, "log_format", "", _choice(("plain", "json")), "plain")
        cluster = self.cluster(entries["cluster"]) if "cluster" in entries else None
        return Config(
            Path(self.filename),
            listeners,
            pools,
            admin,
            state_file,
            shutdown_timeout,
            log_format,  # type: ignore[arg-type]
            cluster,
        )

    def cluster(self, node: Node) -> ClusterConfig | None:
        entries = self.mapping(node, "cluster", "cluster", ("etcd",))
        if entries is None or "etcd" not in entries:
            return None
        etcd = self.mapping(entries["etcd"], "cluster.etcd", "cluster.etcd", ("endpoints",))
        if etcd is None or "endpoints" not in etcd:
            return None
        endpoints = []
        for index, item in enumerate(self.sequence(etcd["endpoints"], "cluster.etcd.endpoints") or ()):
            where = f"cluster.etcd.endpoints[{index}]"
            try:
                endpoints.append(_endpoint(self.scalar(item, where)))
            except _Invalid as exc:
                self.problem(item, where, str(exc))
        if not endpoints:
            self.problem(etcd["endpoints"], "cluster.etcd.endpoints", "at least one etcd endpoint is needed")
        prefix = self.value(etcd, "prefix", "cluster.etcd", _string, "/lbproxy/")
        if not prefix.endswith("/"):
            prefix += "/"
        username = self.value(etcd, "username", "cluster.etcd", _optional(_nonempty), None)
        password = self.value(etcd, "password", "cluster.etcd", _optional(_nonempty), None)
        if (username is None) != (password is None):
            self.problem(node, "cluster.etcd", "username and password go together")
        return ClusterConfig(
            node=self.value(entries, "node", "cluster", _name, _host_name()),
            endpoints=tuple(endpoints),
            prefix=prefix,
            tls=self.etcd_tls(etcd["tls"]) if "tls" in etcd else None,
            username=username,
            password=password,
        )

    def etcd_tls(self, node: Node) -> PoolTlsConfig | None:
        """`cluster.etcd.tls`: as a pool's TLS to its servers (the same context), under etcd's key names."""
        key = "cluster.etcd.tls"
        entries = self.mapping(node, key, key)
        if entries is None:
            return None
        settings = PoolTlsConfig(
            ca=self.value(entries, "ca", key, self._file, None),
            client_cert=self.value(entries, "cert", key, self._file, None),
            client_key=self.value(entries, "key", key, self._file, None),
        )
        if (settings.client_cert is None) != (settings.client_key is None):
            self.problem(node, key, "cert and key go together")
            return None
        try:
            tls.upstream_context(settings)
        except tls.TlsError as error:
            self.problem(node, key, str(error))
            return None
        return settings

    def admin(self, node: Node) -> AdminConfig:
        entries = self.mapping(node, "admin", "admin")
        if entries is None:
            return AdminConfig()
        token = self.value(entries, "token", "admin", _optional_string, None)
        return AdminConfig(
            bind=self.value(entries, "bind", "admin", _bind_address, DEFAULT_ADMIN_BIND),
            token=token or None,  # `${LBPROXY_ADMIN_TOKEN:-}` left empty means no token
        )

    def listeners(self, node: Node, pools: Mapping[str, PoolConfig]) -> tuple[ListenerConfig, ...]:
        items = self.sequence(node, "listeners")
        if items is None:
            return ()
        if not items:
            self.problem(node, "listeners", "at least one listener is needed")
        listeners: list[ListenerConfig] = []
        names: set[str] = set()
        binds: dict[Address, str] = {}
        for index, item in enumerate(items):
            key = f"listeners[{index}]"
            entries = self.mapping(item, key, "listeners[]", ("name", "bind"))
            if entries is None or not {"name", "bind"} <= entries.keys():
                continue
            redirect = self.value(entries, "redirect_https", key, _optional(_integer(1, 65535)), None)
            if "pool" not in entries and redirect is None:
                self.problem(item, key, "missing required key 'pool'")
                continue
            name = self.value(entries, "name", key, _name, "")
            if name in names:
                self.problem(entries["name"], _join(key, "name"), f"duplicate listener name '{name}'")
            names.add(name)
            bind = self.value(entries, "bind", key, _bind_address, Address("", 0))
            clash = next((other for other in binds if _same_socket(bind, other)), None) if bind.port else None
            if clash is not None:
                where = _join(key, "bind")
                also = f" ({clash})" if clash != bind else ""
                self.problem(entries["bind"], where, f"{bind} is already bound by listener '{binds[clash]}'{also}")
            binds.setdefault(bind, name)
            pool = self.value(entries, "pool", key, _string, "")
            if pool and pool not in pools:
                self.problem(entries["pool"], _join(key, "pool"), f"no pool named '{pool}'{_known(pools)}")
            mode = self.value(entries, "mode", key, _choice(MODES), "http")
            page = self.value(entries, "maintenance_page", key, self._file, None)
            if page is not None and mode != "http":
                self.problem(
                    entries["maintenance_page"],
                    _join(key, "maintenance_page"),
                    "only http listeners serve a maintenance page",
                )
            tls_config = self.tls(entries["tls"], _join(key, "tls")) if "tls" in entries else None
            access_log = self.value(entries, "access_log", key, _access_log, None)
            routes = self.routes(entries["routes"], _join(key, "routes"), pools) if "routes" in entries else ()
            if mode != "http":
                for http_only in (
                    "tls",
                    "access_log",
                    "forwarded_headers",
                    "limits",
                    "timeouts",
                    "retry_after",
                    "routes",
                    "redirect_https",
                    "rate_limit",
                    "trusted_proxies",
                ):
                    if http_only in entries:
                        self.problem(entries[http_only], _join(key, http_only), "only http listeners take this key")
            elif "idle_timeout" in entries:
                where = _join(key, "idle_timeout")
                self.problem(entries["idle_timeout"], where, "only tcp listeners take this key (http: timeouts)")
            if redirect is not None:
                for other in ("tls", "routes", "pool"):
                    if other in entries:
                        self.problem(
                            entries[other],
                            _join(key, other),
                            "a redirect_https listener answers every request with a redirect: it takes no " + other,
                        )
            if mode == "http" and pool in pools and pools[pool].send_proxy is not None:
                self.problem(
                    entries["pool"],
                    _join(key, "pool"),
                    f"pool '{pool}' sends a PROXY header (send_proxy), which only tcp listeners do: "
                    "http listeners pass the client address in X-Forwarded-For",
                )
            if mode == "tcp" and pool in pools and pools[pool].tls is not None:
                self.problem(
                    entries["pool"],
                    _join(key, "pool"),
                    f"pool '{pool}' speaks TLS to its servers (tls), which only http listeners do: "
                    "a tcp listener passes TLS through untouched",
                )
            persistence = pools[pool].persistence if pool in pools else None
            if mode == "tcp" and persistence is not None and persistence.type != "source_ip":
                self.problem(
                    entries["pool"],
                    _join(key, "pool"),
                    f"pool '{pool}' keeps sessions by {persistence.type}, which only http listeners can: "
                    "tcp listeners keep them by source_ip",
                )
            listeners.append(
                ListenerConfig(
                    name=name,
                    bind=bind,
                    pool=pool,
                    mode=mode,  # type: ignore[arg-type]
                    maintenance_page=page,
                    retry_after=self.value(entries, "retry_after", key, _duration, 30.0),
                    forwarded_headers=self.value(entries, "forwarded_headers", key, _boolean, True),
                    max_connections=self.value(entries, "max_connections", key, _integer(1, 1_000_000), 10_000),
                    tls=tls_config,
                    access_log=access_log if access_log in (None, "-") else str(self.base / str(access_log)),
                    timeouts=self.listener_timeouts(entries, key),
                    limits=self.listener_limits(entries, key),
                    accept_proxy=self.value(entries, "accept_proxy", key, _boolean, False),
                    idle_timeout=self.value(entries, "idle_timeout", key, _duration, 3600.0),
                    routes=routes,
                    redirect_https=redirect,
                    rate_limit=self.rate_limit(entries["rate_limit"], _join(key, "rate_limit"))
                    if "rate_limit" in entries
                    else None,
                    trusted_proxies=self.networks(entries["trusted_proxies"], _join(key, "trusted_proxies"))
                    if "trusted_proxies" in entries
                    else (),
                )
            )
        return tuple(listeners)

    def networks(self, node: Node, key: str) -> tuple[IPNetwork, ...]:
        """A list of addresses or CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`)."""
        found: list[IPNetwork] = []
        for index, item in enumerate(self.sequence(node, key) or ()):
            where = f"{key}[{index}]"
            try:
                found.append(ipaddress.ip_network(str(self.scalar(item, where)), strict=False))
            except (_Invalid, ValueError) as exc:
                self.problem(item, where, f"expected an address or a CIDR block such as 10.0.0.0/8 ({exc})")
        return tuple(found)

    def rate_limit(self, node: Node, key: str) -> RateLimitConfig | None:
        entries = self.mapping(node, key, "listeners[].rate_limit", ("requests",))
        if entries is None or "requests" not in entries:
            return None
        rate = self.value(entries, "requests", key, _rate, 1.0)
        kind = self.value(entries, "key", key, _string, "source_ip")
        header = None
        if kind.startswith("header:"):
            try:
                header = _header_name(kind[7:])
            except _Invalid as exc:
                self.problem(entries["key"], _join(key, "key"), str(exc))
        elif kind != "source_ip":
            self.problem(entries["key"], _join(key, "key"), f"'{kind}' is not source_ip or header:NAME")
        return RateLimitConfig(
            rate=rate,
            burst=self.value(entries, "burst", key, _integer(1, 1_000_000), max(1, math.ceil(rate))),
            header=header,
            status=self.value(entries, "status", key, _integer(400, 599), 429),
            max_clients=self.value(entries, "max_clients", key, _integer(1, 10_000_000), 100_000),
        )

    def routes(self, node: Node, key: str, pools: Mapping[str, PoolConfig]) -> tuple[RouteSpec, ...]:
        items = self.sequence(node, key)
        if items is None:
            return ()
        specs: list[RouteSpec] = []
        spec_nodes: list[tuple[Node, str]] = []
        for index, item in enumerate(items):
            where = f"{key}[{index}]"
            entries = self.mapping(item, where, "listeners[].routes[]")
            if entries is None:
                continue
            name = self.value(entries, "name", where, _name, str(index))
            match = self.route_match(entries["match"], _join(where, "match")) if "match" in entries else Match()
            pool = self.value(entries, "pool", where, _optional(_string), None)
            deny = self.value(entries, "deny", where, _optional(_integer(100, 599)), None)
            if (pool is None) == (deny is None):
                self.problem(
                    item, where, "a route takes exactly one of 'pool' (where it goes) or 'deny' (a 4xx status)"
                )
            if pool is not None and pool not in pools:
                self.problem(entries["pool"], _join(where, "pool"), f"no pool named '{pool}'{_known(pools)}")
            if deny is not None and not 400 <= deny <= 499:
                self.problem(
                    entries["deny"], _join(where, "deny"), f"deny takes a 4xx status (403, 404, 429...), not {deny}"
                )
            if match.path_regex is not None:
                try:
                    re.compile(match.path_regex)
                except re.error as error:
                    regex_node = _entry(entries["match"], "path_regex")
                    self.problem(regex_node, _join(where, "match.path_regex"), f"invalid regular expression: {error}")
                    continue
            specs.append(RouteSpec(name, match, pool, deny))
            spec_nodes.append((item, where))
        # What is left for routing.check to find: a name used twice, a route shadowed by an earlier
        # one, a host or prefix no request can meet; each reported at the route it names first.
        reported = ("neither pool nor deny", "both pool and deny", "deny must be", "invalid path_regex")
        for message in routing.check(specs):
            if not any(part in message for part in reported):
                named = re.match(r"route (\d+)", message)
                item, where = spec_nodes[int(named.group(1))] if named else (node, key)
                self.problem(item, where, message)
        return tuple(specs)

    def route_match(self, node: Node, key: str) -> Match:
        entries = self.mapping(node, key, "listeners[].routes[].match")
        if entries is None:
            return Match()
        host = self.value(entries, "host", key, _route_host, None)
        prefixes: tuple[str, ...] = ()
        if "path_prefix" in entries:
            where = _join(key, "path_prefix")
            prefix_node = entries["path_prefix"]
            prefix_nodes = self.sequence(prefix_node, where) if isinstance(prefix_node, SequenceNode) else [prefix_node]
            prefixes = tuple(
                self.value({"path_prefix": item}, "path_prefix", key, _request_path, "/") for item in prefix_nodes or ()
            )
        regex = self.value(entries, "path_regex", key, _optional(_nonempty), None)
        header: list[tuple[str, str | None]] = []
        if "header" in entries:
            where = _join(key, "header")
            for name, value_node in (self.mapping(entries["header"], where, None) or {}).items():
                if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
                    self.problem(value_node, _join(where, name), f"{name!r} is not a header name")
                    continue
                if isinstance(value_node, MappingNode):
                    found = self.mapping(value_node, _join(where, name), None) or {}
                    if set(found) != {"present"} or self.value(found, "present", where, _boolean, False) is not True:
                        self.problem(value_node, _join(where, name), "expected a value, or {present: true}")
                        continue
                    header.append((name.lower(), None))
                else:
                    header.append((name.lower(), self.value({name: value_node}, name, where, _string, "")))
        methods: frozenset[str] | None = None
        if "methods" in entries:
            where = _join(key, "methods")
            items = self.sequence(entries["methods"], where) or []
            methods = frozenset(self.value({"methods": item}, "methods", key, _method, "GET") for item in items)
        return Match(host, prefixes, regex, tuple(header), methods)

    def tls(self, node: Node, key: str) -> TlsConfig | None:
        entries = self.mapping(node, key, "listeners[].tls")
        if entries is None:
            return None
        pairs: list[tuple[Node, str, dict[str, Node]]] = []
        if "certificates" in entries:
            if "cert" in entries or "key" in entries:
                self.problem(node, key, "write either cert and key (one certificate) or certificates, not both")
            where = _join(key, "certificates")
            items = self.sequence(entries["certificates"], where) or []
            if not items:
                self.problem(entries["certificates"], where, "at least one certificate is needed")
            for index, item in enumerate(items):
                found = self.mapping(item, f"{where}[{index}]", "listeners[].tls.certificates[]", ("cert", "key"))
                if found is not None:
                    pairs.append((item, f"{where}[{index}]", found))
        else:
            for required in ("cert", "key"):
                if required not in entries:
                    self.problem(node, key, f"missing required key '{required}' (or a list of certificates)")
            pairs.append((node, key, entries))
        certificates: list[Certificate] = []
        for item, where, found in pairs:
            cert = self.value(found, "cert", where, self._file, None)
            private_key = self.value(found, "key", where, self._file, None)
            if cert is None or private_key is None:
                continue
            try:
                certificates.append(tls.inspect(cert, private_key))
            except tls.TlsError as error:
                self.problem(item, where, str(error))
        for certificate, earlier in tls.unreachable(certificates):
            self.problem(
                node,
                key,
                f"{certificate.cert}: no name can reach it: {earlier.cert} comes first for all of "
                f"{', '.join(certificate.names)}",
            )
        min_version = self.value(entries, "min_version", key, _choice(tuple(tls.VERSIONS)), "TLSv1.2")
        ciphers = self.value(entries, "ciphers", key, _optional(_nonempty), None)
        if ciphers is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).set_ciphers(ciphers)
            except ssl.SSLError:
                self.problem(entries["ciphers"], _join(key, "ciphers"), f"OpenSSL knows no cipher in {ciphers!r}")
        client_ca = self.value(entries, "client_ca", key, self._file, None)
        if len(certificates) != len(pairs) or not certificates:
            return None
        settings = TlsConfig(tuple(certificates), min_version, ciphers, client_ca)
        try:
            tls.context(certificates[0], settings)
        except tls.TlsError as error:
            self.problem(node, key, str(error))
            return None
        return settings

    def listener_timeouts(self, entries: dict[str, Node], key: str) -> ListenerTimeouts:
        if "timeouts" not in entries:
            return ListenerTimeouts()
        key = _join(key, "timeouts")
        found = self.mapping(entries["timeouts"], key, "listeners[].timeouts")
        if found is None:
            return ListenerTimeouts()
        default = ListenerTimeouts()
        return ListenerTimeouts(
            request_header=self.value(found, "request_header", key, _duration, default.request_header),
            keepalive=self.value(found, "keepalive", key, _duration, default.keepalive),
            request_body=self.value(found, "request_body", key, _duration, default.request_body),
            tunnel=self.value(found, "tunnel", key, _duration, default.tunnel),
        )

    def listener_limits(self, entries: dict[str, Node], key: str) -> ListenerLimits:
        if "limits" not in entries:
            return ListenerLimits()
        key = _join(key, "limits")
        found = self.mapping(entries["limits"], key, "listeners[].limits")
        if found is None:
            return ListenerLimits()
        default = ListenerLimits()
        return ListenerLimits(
            header_size=self.value(found, "header_size", key, _size, default.header_size),
            header_count=self.value(found, "header_count", key, _integer(1, 10_000), default.header_count),
            target_size=self.value(found, "target_size", key, _size, default.target_size),
            max_body_size=self.value(found, "max_body_size", key, _optional_size, None),
        )

    def pool(self, node: Node, name: str) -> PoolConfig | None:
        key = _join("pools", name)
        if not isinstance(node, MappingNode) and name in _KEYS["pools.<name>"]:
            # `pools: {servers: [...]}`: a pool's key written where the pool's name goes
            self.problem(node, key, f"'{name}' is not a pool: it belongs under pools.<name> (a pool is named first)")
            return None
        entries = self.mapping(node, key, "pools.<name>", ("servers",))
        if entries is None:
            return None
        timeouts, keepalive = PoolTimeouts(), KeepaliveConfig()
        if "timeouts" in entries:
            where = _join(key, "timeouts")
            found = self.mapping(entries["timeouts"], where, "pools.<name>.timeouts") or {}
            timeouts = PoolTimeouts(
                connect=self.value(found, "connect", where, _duration, timeouts.connect),
                response=self.value(found, "response", where, _duration, timeouts.response),
            )
        if "keepalive" in entries:
            where = _join(key, "keepalive")
            found = self.mapping(entries["keepalive"], where, "pools.<name>.keepalive") or {}
            keepalive = KeepaliveConfig(
                max_idle=self.value(found, "max_idle", where, _integer(0, 100_000), keepalive.max_idle),
                idle_timeout=self.value(found, "idle_timeout", where, _duration, keepalive.idle_timeout),
            )
        servers = self.servers(entries["servers"], _join(key, "servers")) if "servers" in entries else ()
        primaries = sum(1 for server in servers if not server.backup)
        if "min_up" in entries and servers:
            min_up = self.value(entries, "min_up", key, _integer(1, 10_000), 1)
            if min_up > primaries:
                self.problem(
                    entries["min_up"],
                    _join(key, "min_up"),
                    f"min_up {min_up} is more than the pool's {primaries} primary servers: "
                    "the backups would always serve",
                )
            elif min_up > 1 and primaries == len(servers):
                self.problem(
                    entries["min_up"],
                    _join(key, "min_up"),
                    "min_up activates the pool's backup servers (backup: true), and it has none",
                )
        health = self.health(entries["health"], _join(key, "health")) if "health" in entries else HealthConfig()
        persistence = (
            self.persistence(entries["persistence"], _join(key, "persistence")) if "persistence" in entries else None
        )
        pool_tls = self.pool_tls(entries["tls"], _join(key, "tls")) if "tls" in entries else None
        queue = QueueConfig()
        if "queue" in entries:
            where = _join(key, "queue")
            found = self.mapping(entries["queue"], where, "pools.<name>.queue") or {}
            queue = QueueConfig(
                max_size=self.value(found, "max_size", where, _integer(0, 1_000_000), queue.max_size),
                timeout=self.value(found, "timeout", where, _duration, queue.timeout),
            )
        hedge = None
        if "hedge" in entries:
            where = _join(key, "hedge")
            found = self.mapping(entries["hedge"], where, "pools.<name>.hedge") or {}
            default = HedgeConfig()
            hedge = HedgeConfig(
                after=self.value(found, "after", where, _hedge_after, default.after),
                floor=self.value(found, "floor", where, _duration, default.floor),
                max_extra=self.value(found, "max_extra", where, _share, default.max_extra),
            )
        passive = self.passive(entries["passive"], _join(key, "passive")) if "passive" in entries else None
        if passive is not None and health.type == "none":
            # Passive detection only takes servers out; without probes nothing would bring them back.
            self.problem(entries["passive"], _join(key, "passive"), "passive detection needs a health check")
        return PoolConfig(
            name=name,
            servers=servers,
            policy=self.value(entries, "policy", key, _choice(POLICIES), "round_robin"),  # type: ignore[arg-type]
            retries=self.value(entries, "retries", key, _integer(0, 10), 2),
            backup_pool=self.value(entries, "backup_pool", key, _optional(_string), None),
            health=health,
            timeouts=timeouts,
            keepalive=keepalive,
            passive=passive,
            min_up=self.value(entries, "min_up", key, _integer(1, 10_000), 1),
            max_down_fraction=self.value(entries, "max_down_fraction", key, _optional(_fraction), None),
            slow_start=self.value(entries, "slow_start", key, _optional(_duration), None),
            disable_grace=self.value(entries, "disable_grace", key, _duration, 10.0),
            send_proxy=self.value(entries, "send_proxy", key, _optional(_choice(("v1", "v2"))), None),  # type: ignore[arg-type]
            persistence=persistence,
            tls=pool_tls,
            queue=queue,
            hedge=hedge,
        )

    def pool_tls(self, node: Node, key: str) -> PoolTlsConfig | None:
        entries = self.mapping(node, key, "pools.<name>.tls")
        if entries is None:
            return None
        settings = PoolTlsConfig(
            verify=self.value(entries, "verify", key, _boolean, True),
            ca=self.value(entries, "ca", key, self._file, None),
            server_name=self.value(entries, "server_name", key, _optional(_route_host), None),
            client_cert=self.value(entries, "client_cert", key, self._file, None),
            client_key=self.value(entries, "client_key", key, self._file, None),
        )
        if (settings.client_cert is None) != (settings.client_key is None):
            self.problem(node, key, "client_cert and client_key go together")
            return None
        try:
            if settings.client_cert is not None and settings.client_key is not None:
                own = tls.inspect(settings.client_cert, settings.client_key)
                settings = dataclasses.replace(settings, client_expiry=own.not_after)
            tls.upstream_context(settings)
        except tls.TlsError as error:
            self.problem(node, key, str(error))
            return None
        return settings

    def persistence(self, node: Node, key: str) -> PersistenceConfig | None:
        entries = self.mapping(node, key, "pools.<name>.persistence", ("type",))
        if entries is None or "type" not in entries:
            return None
        kind = self.value(entries, "type", key, _choice(("cookie", "source_ip", "header")), "cookie")
        header = self.value(entries, "header", key, _optional(_header_name), None)
        if kind == "header" and header is None:
            self.problem(node, key, "type header needs 'header': the request header whose value is the key")
        for own, owner in (("cookie", "cookie"), ("max_age", "cookie"), ("secret", "cookie"), ("header", "header")):
            if own in entries and kind != owner:
                self.problem(entries[own], _join(key, own), f"only type {owner} takes this key")
        if "balance" in entries and kind == "cookie":
            self.problem(entries["balance"], _join(key, "balance"), "only types source_ip and header take this key")
        return PersistenceConfig(
            type=kind,  # type: ignore[arg-type]
            cookie=self.value(entries, "cookie", key, _header_name, "LBSRV"),
            max_age=self.value(entries, "max_age", key, _optional(_duration), None),
            header=header,
            balance=self.value(entries, "balance", key, _balance, 1.25),
            secret=self.value(entries, "secret", key, _string, ""),
        )

    def servers(self, node: Node, key: str) -> tuple[ServerConfig, ...]:
        items = self.sequence(node, key)
        if items is None:
            return ()
        if not items:
            self.problem(node, key, "at least one server is needed")
        servers: list[ServerConfig] = []
        names: set[str] = set()
        for index, item in enumerate(items):
            where = f"{key}[{index}]"
            entries = self.mapping(item, where, "pools.<name>.servers[]", ("name", "address"))
            if entries is None or not {"name", "address"} <= entries.keys():
                continue
            name = self.value(entries, "name", where, _name, "")
            if name in names:
                self.problem(entries["name"], _join(where, "name"), f"duplicate server name '{name}' in this pool")
            names.add(name)
            address = self.value(entries, "address", where, _server_address, Address("", 0))
            if self.resolve and address.host:
                self.check_resolves(entries["address"], _join(where, "address"), address)
            servers.append(
                ServerConfig(
                    name=name,
                    address=address,
                    ratio=self.value(entries, "ratio", where, _integer(1, MAX_RATIO), 1),
                    backup=self.value(entries, "backup", where, _boolean, False),
                    max_connections=self.value(
                        entries, "max_connections", where, _optional(_integer(1, 1_000_000)), None
                    ),
                )
            )
        return tuple(servers)

    def check_resolves(self, node: Node, key: str, address: Address) -> None:
        """A problem if the server name in `address` does not resolve: it would stop `lbproxy run`."""
        if address.host not in self._lookups:
            try:
                resolve(address)
                self._lookups[address.host] = None
            except OSError as exc:
                self._lookups[address.host] = f"cannot resolve {address.host!r}: {exc.strerror or exc}"
        failure = self._lookups[address.host]
        if failure is not None:
            self.problem(node, key, failure)

    def health(self, node: Node, key: str) -> HealthConfig:
        entries = self.mapping(node, key, "pools.<name>.health")
        if entries is None:
            return HealthConfig()
        # A health block without a type is a TCP check, as HAProxy's bare `check` is.
        health = HealthConfig(
            type=self.value(entries, "type", key, _choice(HEALTH_TYPES), "tcp"),  # type: ignore[arg-type]
            path=self.value(entries, "path", key, _request_path, "/"),
            method=self.value(entries, "method", key, _method, "GET"),
            host=self.value(entries, "host", key, _optional(_host_header), None),
            expect_status=self.value(entries, "expect_status", key, _status_range, (200, 399)),
            expect_body=self.value(entries, "expect_body", key, _optional(_nonempty), None),
            interval=self.value(entries, "interval", key, _duration, 2.0),
            timeout=self.value(entries, "timeout", key, _duration, 1.0),
            rise=self.value(entries, "rise", key, _integer(1, 100), 2),
            fall=self.value(entries, "fall", key, _integer(1, 100), 3),
            start=self.value(entries, "start", key, _choice(("up", "down")), None),  # type: ignore[arg-type]
        )
        if health.type != "http":
            for http_only in ("path", "method", "host", "expect_status", "expect_body"):
                if http_only in entries:
                    self.problem(entries[http_only], _join(key, http_only), "only http health checks take this key")
        if health.method == "HEAD" and health.expect_body is not None:
            self.problem(entries["expect_body"], _join(key, "expect_body"), "a HEAD probe gets no body to look into")
        return health

    def passive(self, node: Node, key: str) -> PassiveConfig | None:
        entries = self.mapping(node, key, "pools.<name>.passive")
        if entries is None:
            return None
        default = PassiveConfig()
        return PassiveConfig(
            consecutive_failures=self.value(
                entries, "consecutive_failures", key, _integer(1, 1000), default.consecutive_failures
            ),
            on_5xx=self.value(entries, "on_5xx", key, _boolean, default.on_5xx),
        )

    def check_backup_pools(self, pools: Mapping[str, PoolConfig], nodes: Mapping[str, Node]) -> None:
        loops: set[frozenset[str]] = set()
        for name, pool in pools.items():
            if pool.backup_pool is None:
                continue
            where = _join(_join("pools", name), "backup_pool")
            line_node = _entry(nodes[name], "backup_pool")
            if pool.backup_pool not in pools:
                self.problem(line_node, where, f"no pool named '{pool.backup_pool}'{_known(pools)}")
                continue
            chain = [name]
            current: str | None = pool.backup_pool
            while current is not None and current in pools and current not in chain:
                chain.append(current)
                current = pools[current].backup_pool
            if current == name and frozenset(chain) not in loops:  # each loop once, where it is first met
                loops.add(frozenset(chain))
                self.problem(line_node, where, "backup pools form a loop: " + " -> ".join([*chain, name]))

    def _writable_path(self, value: object) -> Path:
        path = Path(_string(value))
        if not path.is_absolute():
            path = self.base / path
        if not path.parent.is_dir():
            raise _Invalid(f"no such folder: {path.parent}")
        if path.is_dir():
            raise _Invalid(f"{path} is a folder: name a file in it")
        return path

    def _file(self, value: object) -> Path:
        text = _string(value)
        path = Path(text)
        if not path.is_absolute():
            path = self.base / path
        if not path.is_file():
            raise _Invalid(f"no such file: {path}")
        return path


def _same_socket(a: Address, b: Address) -> bool:
    """Whether binding both would clash: the same port on the same host, or either on every address."""
    return a.port == b.port and (a.host == b.host or a.host in _WILDCARDS or b.host in _WILDCARDS)


def _entry(node: Node, name: str) -> Node:
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.value == name:
                return value_node  # type: ignore[no-any-return]
    return node


def _unknown_key(name: str | None, place: str | None) -> str:
    """What to say of a key that `place` does not take: where it belongs if another place takes it."""
    elsewhere = [other for other, keys in _KEYS.items() if other != place and name in keys]
    if elsewhere:
        where = " or ".join("at the top level" if other == _TOP else f"under {other}" for other in elsewhere)
        return f"unknown key '{name}' here; it belongs {where}"
    return f"unknown key (expected one of: {', '.join(_KEYS[place])})" if place else "unknown key"


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _known(names: Mapping[str, object]) -> str:
    return f" (pools: {', '.join(names)})" if names else ""


def _bad_name(name: str) -> str:
    return f"invalid name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or digit"


# -- value checks: each takes the constructed YAML value and returns it typed, or raises _Invalid --


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {value!r} (quote it)")
    return value


def _optional(check: Callable[[object], T]) -> Callable[[object], T | None]:
    """`check`, or None for YAML's null (`key: ~`, or an empty `${VAR:-}`)."""

    def optional(value: object) -> T | None:
        return None if value is None else check(value)

    return optional


def _nonempty(value: object) -> str:
    text = _string(value)
    if not text:
        raise _Invalid("expected a non-empty string")
    return text


def _optional_string(value: object) -> str | None:
    return None if value is None else _string(value)


def _name(value: object) -> str:
    text = _string(value)
    if not _NAME.fullmatch(text):
        raise _Invalid(_bad_name(text))
    return text


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value


def _integer(low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer from {low} to {high}, got {value!r}")
        if not low <= value <= high:
            raise _Invalid(f"expected an integer from {low} to {high}, got {value}")
        return value

    return check


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in options:
            raise _Invalid(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return check


def _duration(value: object) -> float:
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _Invalid(f"expected a duration such as 500ms, 2s or 1m, got {value!r}")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise _Invalid(f"expected a duration above zero, got {value!r}")
    return seconds


def _size(value: object) -> int:
    """A byte count: `65536`, `64KiB`, `64k`, `10MB`, `1GiB`."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) == 0:
        raise _Invalid(f"expected a size such as 65536, 64KiB or 10MB, got {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(s|m|h)")
_PER: Final = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _rate(value: object) -> float:
    """Requests a second, from `100/s`, `600/m` or `10000/h`."""
    match = _RATE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise _Invalid(f"expected a rate such as 100/s, 600/m or 10000/h, got {value!r}")
    return float(match.group(1)) / _PER[match.group(2)]


def _optional_size(value: object) -> int | None:
    return None if value in (None, "unlimited") else _size(value)


def _access_log(value: object) -> str | None:
    """false: off; true or "-": standard output; else a file path."""
    if value is False or value is None:
        return None
    if value is True:
        return "-"
    return _string(value)


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise _Invalid(f"expected a fraction between 0 and 1 such as 0.5, got {value!r}")
    return float(value)


def _host_name() -> str:
    """This machine's short host name, as a node's name (`lbproxy` if it is not a valid name)."""
    name = socket.gethostname().split(".")[0]
    return name if _NAME.fullmatch(name) else "lbproxy"


def _endpoint(value: object) -> str:
    """An etcd client URL: `http://HOST:PORT` or `https://HOST:PORT` (with `cluster.etcd.tls`, or the system's CAs)."""
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^/\s]+:\d+/?", value):
        raise _Invalid(f"expected an etcd endpoint such as http://10.56.1.5:2379, got {value!r}")
    return value.rstrip("/")


def _hedge_after(value: object) -> float | None:
    """`p99` (None: the pool's own p99 time to first byte) or a duration."""
    return None if value == "p99" else _duration(value)


def _share(value: object) -> float:
    """A share of a whole: `10%`, or a fraction above 0 and at most 1 (`0.1`)."""
    if isinstance(value, str) and value.endswith("%"):
        try:
            value = float(value[:-1]) / 100
        except ValueError:
            raise _Invalid(f"expected a share such as 10% or 0.1, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise _Invalid(f"expected a share such as 10% or 0.1 (above 0, at most 100%), got {value!r}")
    return float(value)


def _method(value: object) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Z]{1,20}", text):
        raise _Invalid(f"expected an HTTP method such as GET or HEAD, got {text!r}")
    return text


def _header_name(value: object) -> str:
    text = _string(value)
    if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", text):
        raise _Invalid(f"expected a name of letters, digits and -_.!#$%&'*+^`|~, got {text!r}")
    return text


def _balance(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 100:
        raise _Invalid(f"expected a factor of at least 1 such as 1.25, got {value!r}")
    return float(value)


def _route_host(value: object) -> str:
    text = _string(value).lower().rstrip(".")
    name = text.removeprefix("*.")
    if not name or not _HOSTNAME.fullmatch(name):
        raise _Invalid(f"expected a host name such as api.example.com or *.example.com, got {value!r}")
    return text


def _host_header(value: object) -> str:
    text = _string(value)
    if not text or any(c <= " " or c in "/@?#\\" for c in text):
        raise _Invalid(f"expected a Host header value such as www.example.com or app:8080, got {text!r}")
    return text


def _request_path(value: object) -> str:
    text = _string(value)
    if not text.startswith("/") or any(c <= " " or c == "\x7f" for c in text):
        raise _Invalid(f"expected a request path starting with '/', without spaces, got {text!r}")
    return text


def _status_range(value: object) -> tuple[int, int]:
    """`200`, or `200-399`."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\d{3}-\d{3}", value):
        low, high = (int(part) for part in value.split("-"))
    else:
        raise _Invalid(f"expected a status or a range such as 200-399, got {value!r}")
    if not 100 <= low <= high <= 599:
        raise _Invalid(f"expected statuses from 100 to 599, low before high, got {value!r}")
    return (low, high)


def _address(value: object, min_port: int) -> Address:
    expected = "expected HOST:PORT (IPv6 as [::1]:80)"
    if not isinstance(value, str):
        raise _Invalid(f"{expected}, got {value!r}")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{expected}, got {value!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:
            raise _Invalid(f"{expected}, got {value!r}: put an IPv6 address in brackets")
        if sep and not _HOSTNAME.fullmatch(host):
            raise _Invalid(f"{expected}, got {value!r}: {host!r} is not an IPv4 address or host name")
    if not sep or not port.isdigit():
        raise _Invalid(f"{expected}, got {value!r}")
    if not min_port <= int(port) <= 65535:
        raise _Invalid(f"port {int(port)} is out of range {min_port}-65535")
    return Address(host, int(port))


def resolve(address: Address) -> str:
    """The IP address lbproxy connects to for a server at `address` (as HAProxy's init-addr): the host as
    written if it is an IP address, else the first address the system resolver returns for the name.

    The one place a server name is looked up: the runtime calls it (in a thread: it blocks) at start
    and on each reload, `load(resolve=True)` for `lbproxy check`. Raises OSError (socket.gaierror).
    """
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        return str(infos[0][4][0])
    return address.host


def server_from(fields: Mapping[str, object]) -> ServerConfig:
    """A server as the admin API is given one (a JSON object with the keys of `pools.<name>.servers[]`),
    checked as the file's are; ValueError names the key that is wrong."""
    keys = _KEYS["pools.<name>.servers[]"]
    for key in fields:
        if key not in keys:
            raise ValueError(f"unknown key {key!r}: expected {', '.join(keys)}")
    for key in ("name", "address"):
        if key not in fields:
            raise ValueError(f"{key}: missing")
    checks: dict[str, Callable[[object], object]] = {
        "name": _name,
        "address": _server_address,
        "ratio": _integer(1, MAX_RATIO),
        "backup": _boolean,
        "max_connections": _optional(_integer(1, 1_000_000)),
    }
    values: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            values[key] = checks[key](value)
        except _Invalid as error:
            raise ValueError(f"{key}: {error}") from None
    return ServerConfig(**values)


def server_fields(server: ServerConfig) -> dict[str, object]:
    """`server` as `server_from` takes it (JSON values)."""
    return {
        "name": server.name,
        "address": str(server.address),
        "ratio": server.ratio,
        "backup": server.backup,
        "max_connections": server.max_connections,
    }


def _server_address(value: object) -> Address:
    return _address(value, 1)


def _bind_address(value: object) -> Address:
    return _address(value, 0)  # port 0 lets the kernel pick: tests use it


__all__ = [
    "Address",
    "AdminConfig",
    "Config",
    "ConfigError",
    "HealthConfig",
    "ListenerConfig",
    "PoolConfig",
    "Problem",
    "ServerConfig",
    "load",
    "parse",
    "resolve",
    "server_fields",
    "server_from",
]
