"""Routes: each match key, first-match order, safe path matching, `check`, and the table against a
naive reference.

Sans-IO: a `RouteTable` is built from `RouteSpec`s and asked with the method, target, Host and flat
field list that `request_head.RequestReader` has. Hypothesis checks that the indexed table answers as
a linear first-match scan would, that a route `check` calls unreachable is never picked, and that
spelling a path another way never changes what it normalizes to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy import build, routing
from lbproxy.routing import Match, RouteError, RouteSpec, RouteTable, check, host_key, normalize_path

QUICK = settings(max_examples=150, deadline=None)


def specs_of(*matches: Match) -> list[RouteSpec]:
    """One route per match, named by its index, each to pool p0, p1..."""
    return [RouteSpec(name=str(index), match=match, pool=f"p{index}") for index, match in enumerate(matches)]


def fields_of(*headers: tuple[str, str]) -> list[bytes]:
    """The flat field list of RequestReader: name, b": ", value, CRLF, ..."""
    fields: list[bytes] = []
    for name, value in headers:
        fields += (name.encode(), b": ", value.encode(), b"\r\n")
    return fields


def picked(
    table: RouteTable,
    target: bytes = b"/",
    host: bytes | None = b"example.com",
    method: bytes = b"GET",
    headers: Sequence[tuple[str, str]] = (),
) -> int | None:
    """The index of the route `table` picks, None for the default pool."""
    route = table.pick(method, target, host, fields_of(*headers))
    return None if route is None else route.index


def table_of(*matches: Match) -> RouteTable:
    return RouteTable(specs_of(*matches))


# -- hosts --


@pytest.mark.parametrize(
    ("host", "key"),
    [
        (b"example.com", b"example.com"),
        (b"Example.COM", b"example.com"),
        (b"example.com:8080", b"example.com"),
        (b"example.com.", b"example.com"),
        (b"EXAMPLE.com.:80", b"example.com"),
        (b"[::1]:80", b"[::1]"),
        (b"[::1]", b"[::1]"),
        (b"[2001:DB8::1]:443", b"[2001:db8::1]"),
        (b"127.0.0.1:80", b"127.0.0.1"),
        (b"", b""),
    ],
)
def test_host_key(host: bytes, key: bytes) -> None:
    assert host_key(host) == key


def test_exact_host_ignores_case_port_and_trailing_dot() -> None:
    table = table_of(Match(host="api.example.com"))
    for host in (
        b"api.example.com",
        b"API.Example.Com",
        b"api.example.com:8443",
        b"api.example.com.",
        b"api.example.com.:1",
    ):
        assert picked(table, host=host) == 0
    for host in (b"example.com", b"xapi.example.com", b"api.example.com.evil", b"a.api.example.com"):
        assert picked(table, host=host) is None
    assert picked(table, host=None) is None


def test_ipv6_host() -> None:
    table = table_of(Match(host="[::1]"))
    assert picked(table, host=b"[::1]:8080") == 0
    assert picked(table, host=b"[::1]") == 0
    assert picked(table, host=b"[::2]") is None


def test_wildcard_matches_one_or_more_labels_not_the_bare_domain() -> None:
    table = table_of(Match(host="*.example.com"))
    for host in (b"a.example.com", b"a.b.example.com", b"A.Example.com:80", b"x.y.z.example.com."):
        assert picked(table, host=host) == 0
    for host in (b"example.com", b"example.com.", b"aexample.com", b"a.example.org", b"com", b".example.com"):
        assert picked(table, host=host) is None


def test_several_wildcards_the_first_written_wins() -> None:
    table = table_of(Match(host="*.example.com"), Match(host="*.b.example.com"))
    assert picked(table, host=b"a.b.example.com") == 0  # the narrower one is written second: never reached
    table = table_of(Match(host="*.b.example.com"), Match(host="*.example.com"))
    assert picked(table, host=b"a.b.example.com") == 0
    assert picked(table, host=b"b.example.com") == 1
    assert picked(table, host=b"a.c.example.com") == 1


def test_first_match_order_across_exact_wildcard_and_any_host() -> None:
    table = table_of(
        Match(path_prefix=("/first/",)),  # any host, written first
        Match(host="*.example.com", path_prefix=("/w/",)),  # a wildcard before an exact route
        Match(host="api.example.com"),
        Match(host="*.example.com"),
        Match(path_prefix=("/",)),  # any host, written last
    )
    assert picked(table, b"/first/x", b"api.example.com") == 0
    assert picked(table, b"/w/x", b"api.example.com") == 1
    assert picked(table, b"/other", b"api.example.com") == 2
    assert picked(table, b"/w/x", b"www.example.com") == 1
    assert picked(table, b"/other", b"www.example.com") == 3
    assert picked(table, b"/first/", b"www.example.com") == 0
    assert picked(table, b"/other", b"example.org") == 4
    assert picked(table, b"/first/", None) == 0
    assert picked(table, b"/w/", None) == 4


def test_no_route_and_empty_match() -> None:
    assert picked(table_of()) is None
    table = table_of(Match())
    assert picked(table, b"*", None, b"OPTIONS") == 0
    assert picked(table, b"/anything?q", b"x.y", b"DELETE", [("X-A", "1")]) == 0


# -- paths --


def test_path_prefix_one_or_several() -> None:
    table = table_of(Match(path_prefix=("/static/",)), Match(path_prefix=("/img/", "/css/")))
    assert picked(table, b"/static/a.js") == 0
    assert picked(table, b"/static/") == 0
    assert picked(table, b"/static") is None
    assert picked(table, b"/Static/a.js") is None  # case-sensitive, as HAProxy's path_beg
    assert picked(table, b"/css/a.css?v=1") == 1
    assert picked(table, b"/img/a.png") == 1
    assert picked(table, b"http://example.com/img/a.png") == 1
    assert picked(table, b"/js/a.js") is None


def test_path_prefix_sees_the_path_without_its_query() -> None:
    table = table_of(Match(path_prefix=("/a?x",)), Match(path_prefix=("/b",)))
    assert picked(table, b"/a?x=1") is None
    assert picked(table, b"/?/b") is None
    assert picked(table, b"/b?/a") == 1


def test_path_regex_is_searched_unanchored() -> None:
    table = table_of(Match(path_regex=r"\.php$"), Match(path_regex=r"^/api/v[0-9]+/"), Match(path_regex="(?i)^/admin"))
    assert picked(table, b"/x/index.php") == 0
    assert picked(table, b"/x/index.php?y=.html") == 0
    assert picked(table, b"/index.php5") is None
    assert picked(table, b"/api/v2/users") == 1
    assert picked(table, b"/v1/api/v2/") is None
    assert picked(table, b"/ADMIN/x") == 2
    assert picked(table, b"/%41dmin") == 2  # the regex sees the normalized path too


# The deny of the issue, and the spellings that must not walk around it (CVE-2021-41773 and kin).
EVASIONS = [
    b"/ServiceCenter/",
    b"/ServiceCenter/a?x",
    b"/x/../ServiceCenter/",
    b"/%53erviceCenter/",
    b"/%53%65rviceCenter/a",
    b"//ServiceCenter/",
    b"///ServiceCenter//a",
    b"/%2e%2e/ServiceCenter/",
    b"/%2E%2E/ServiceCenter/",
    b"/.%2e/ServiceCenter/a",
    b"/./ServiceCenter/",
    b"/a/b/../../ServiceCenter/",
    b"/../../ServiceCenter/",
    b"/ServiceCenter%2Fa",
    b"/ServiceCenter%2fa",
    b"/x%2F..%2FServiceCenter/",
    b"/%2FServiceCenter/",
    b"/ServiceCenter/.",
    b"/ServiceCenter/x/..",
    b"http://example.com/ServiceCenter/",
    b"http://example.com//x/../ServiceCenter/",
    b"/ServiceCenter/#frag",
]
SAFE = [
    b"/ServiceCenterX",
    b"/ServiceCenter",
    b"/ServiceCenter?/",
    b"/other/ServiceCenter/",
    b"/servicecenter/",
    b"/ServiceCenter%252F",  # %25 stays encoded: a double-encoded slash is not decoded twice
    b"/ServiceCenter%5C",
    b"/ServiceCenter/../x",
    b"/x?/ServiceCenter/",
    b"*",
]


@pytest.mark.parametrize("target", EVASIONS)
def test_deny_prefix_is_not_walked_around(target: bytes) -> None:
    table = RouteTable([RouteSpec(name="scada", match=Match(path_prefix=("/ServiceCenter/",)), deny=403)])
    route = table.pick(b"GET", target, b"example.com", [])
    assert route is not None
    assert route.deny == 403


@pytest.mark.parametrize("target", SAFE)
def test_deny_prefix_leaves_other_paths(target: bytes) -> None:
    table = RouteTable([RouteSpec(name="scada", match=Match(path_prefix=("/ServiceCenter/",)), deny=403)])
    assert table.pick(b"GET", target, b"example.com", []) is None


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/", b"/"),
        (b"/a/b?q=1", b"/a/b"),
        (b"/a/b#f", b"/a/b"),
        (b"/a?b#c", b"/a"),
        (b"*", b"*"),
        (b"http://example.com", b"/"),
        (b"http://example.com?q", b"/"),
        (b"http://example.com:80/a/./b?q", b"/a/b"),
        (b"HTTPS://Example.com/A", b"/A"),
        (b"/%41%62%63%2D%2e%5F%7e%30", b"/Abc-._~0"),  # unreserved: decoded
        (b"/%3f%2a%c3%a9%25%00%20", b"/%3F%2A%C3%A9%25%00%20"),  # the rest: hex upper-cased
        (b"/a%2fb%2Fc", b"/a/b/c"),
        (b"/%zz/%4/%", b"/%zz/%4/%"),  # invalid encodings stay
        (b"/a%", b"/a%"),
        (b"/%%41", b"/%A"),
        (b"/%2541", b"/%2541"),  # decoded once, never twice
        (b"//a///b//", b"/a/b/"),
        (b"/..", b"/"),
        (b"/../..", b"/"),
        (b"/a/..", b"/"),
        (b"/a/.", b"/a/"),
        (b"/.a/..b/...", b"/.a/..b/..."),
        (b"/a/%2e%2E/b", b"/b"),
        (b"/a//../b", b"/b"),
        (b"/a/%2F../b", b"/b"),  # the slashes merged first, as nginx does
        (b"/caf\xc3\xa9/", b"/caf\xc3\xa9/"),  # raw bytes pass through
    ],
)
def test_normalize_path(target: bytes, path: bytes) -> None:
    assert normalize_path(target) == path


# RFC 3986 §5.4: the examples against base http://a/b/c/d;p?q, as the merged path (§5.2.3) that
# remove_dot_segments receives, and its result.
RFC_3986_EXAMPLES = [
    ("/b/c/g", "/b/c/g"),
    ("/b/c/./g", "/b/c/g"),
    ("/b/c/g/", "/b/c/g/"),
    ("/g", "/g"),
    ("/b/c/g?y", "/b/c/g"),
    ("/b/c/g#s", "/b/c/g"),
    ("/b/c/g?y#s", "/b/c/g"),
    ("/b/c/;x", "/b/c/;x"),
    ("/b/c/g;x", "/b/c/g;x"),
    ("/b/c/d;p", "/b/c/d;p"),
    ("/b/c/.", "/b/c/"),
    ("/b/c/./", "/b/c/"),
    ("/b/c/..", "/b/"),
    ("/b/c/../", "/b/"),
    ("/b/c/../g", "/b/g"),
    ("/b/c/../..", "/"),
    ("/b/c/../../", "/"),
    ("/b/c/../../g", "/g"),
    # §5.4.2, abnormal examples
    ("/b/c/../../../g", "/g"),
    ("/b/c/../../../../g", "/g"),
    ("/./g", "/g"),
    ("/../g", "/g"),
    ("/b/c/g.", "/b/c/g."),
    ("/b/c/.g", "/b/c/.g"),
    ("/b/c/g..", "/b/c/g.."),
    ("/b/c/..g", "/b/c/..g"),
    ("/b/c/./../g", "/b/g"),
    ("/b/c/./g/.", "/b/c/g/"),
    ("/b/c/g/./h", "/b/c/g/h"),
    ("/b/c/g/../h", "/b/c/h"),
    ("/b/c/g;x=1/./y", "/b/c/g;x=1/y"),
    ("/b/c/g;x=1/../y", "/b/c/y"),
    ("/b/c/g?y/./x", "/b/c/g"),
    ("/b/c/g?y/../x", "/b/c/g"),
    ("/b/c/g#s/./x", "/b/c/g"),
    ("/b/c/g#s/../x", "/b/c/g"),
    # §5.2.4's own walk-through
    ("/a/b/c/./../../g", "/a/g"),
    ("/mid/content=5/../6", "/mid/6"),
]


@pytest.mark.parametrize(("merged", "result"), RFC_3986_EXAMPLES)
def test_remove_dot_segments_rfc_3986_examples(merged: str, result: str) -> None:
    assert normalize_path(merged.encode()) == result.encode()


# Paths from a few segments that dot segments, slashes and encodings make interesting.
SEGMENT = st.sampled_from(["a", "a", "b", "b", "A", "..", ".", "", "%2F", "%2e", "%61", "%zz", "%3f", "Service", "~"])
PATH = st.lists(SEGMENT, max_size=6).map(lambda segments: ("/" + "/".join(segments)).encode())


@QUICK
@given(PATH)
def test_normalized_paths_are_normal(target: bytes) -> None:
    path = normalize_path(target)
    assert normalize_path(path) == path
    assert path.startswith(b"/")
    assert b"//" not in path
    assert not any(segment in (b".", b"..") for segment in path.split(b"/"))


def _spell(byte: int, how: int) -> bytes:
    """One byte of a path as-is, percent-encoded in upper or lower case."""
    if how == 0:
        return bytes((byte,))
    encoded = b"%%%02X" % byte
    return encoded if how == 1 else encoded.lower()


@QUICK
@given(PATH, st.binary(min_size=64, max_size=64))
def test_spelling_a_path_another_way_changes_nothing(target: bytes, hows: bytes) -> None:
    """Percent-encoding any unreserved character or any slash (but the first) gives the same path."""
    raw = normalize_path(target)  # no encodings left but those that stay
    spelled = [raw[:1]]
    for position, byte in enumerate(raw[1:]):
        spellable = byte in routing._UNRESERVED or byte == 0x2F
        spelled.append(_spell(byte, hows[position % 64] % 3 if spellable else 0))
    assert normalize_path(b"".join(spelled)) == raw


@pytest.mark.skipif(build.RUNNING == "mypyc", reason="counts calls through a patched module function: pure build only")
def test_path_is_normalized_lazily_and_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []

    def counting(target: bytes) -> bytes:
        calls.append(target)
        return normalize_path(target)

    monkeypatch.setattr(routing, "normalize_path", counting)
    table = table_of(
        Match(host="api.example.com"),
        Match(path_prefix=("/a/",)),
        Match(path_regex="^/b/"),
        Match(methods=frozenset({"GET"})),
    )
    assert picked(table, b"/c", b"api.example.com") == 0
    assert calls == []
    assert picked(table, b"/c", b"www.example.com") == 3
    assert calls == [b"/c"]
    assert picked(table, b"/c", b"www.example.com", b"POST") is None
    assert len(calls) == 2
    assert picked(table_of(Match(methods=frozenset({"GET"}))), b"/c") == 0
    assert len(calls) == 2


# -- headers and methods --


def test_header_present_and_exact() -> None:
    table = table_of(
        Match(header=(("x-canary", "1"),)),
        Match(header=(("x-debug", None),)),
    )
    assert picked(table, headers=[("X-Canary", "1")]) == 0
    assert picked(table, headers=[("x-canary", "1")]) == 0
    assert picked(table, headers=[("X-CANARY", "1")]) == 0
    assert picked(table, headers=[("X-Canary", "10")]) is None
    assert picked(table, headers=[("X-Canary", "1 ")]) is None  # the whole value, as received
    assert picked(table, headers=[("X-Canary", "2"), ("X-Debug", "")]) == 1
    assert picked(table, headers=[("X-Debug", "anything")]) == 1
    assert picked(table, headers=[("X-Debu", "1"), ("X-Debugs", "1")]) is None
    assert picked(table) is None


def test_header_occurring_several_times_matches_any_occurrence() -> None:
    table = table_of(Match(header=(("x-canary", "1"),)))
    assert picked(table, headers=[("X-Canary", "0"), ("Accept", "1"), ("x-canary", "1")]) == 0
    assert picked(table, headers=[("X-Canary", "0"), ("X-Canary", "0, 1")]) is None


def test_several_header_conditions_all_hold() -> None:
    table = table_of(Match(header=(("x-a", "1"), ("x-b", None))))
    assert picked(table, headers=[("X-B", "z"), ("X-A", "1")]) == 0
    assert picked(table, headers=[("X-A", "1")]) is None
    assert picked(table, headers=[("X-B", "1")]) is None


def test_methods() -> None:
    table = table_of(Match(methods=frozenset({"GET", "HEAD"})))
    assert picked(table, method=b"GET") == 0
    assert picked(table, method=b"HEAD") == 0
    assert picked(table, method=b"POST") is None
    assert picked(table, method=b"get") is None  # methods are case-sensitive (RFC 9110 §9.1)


def test_all_conditions_must_hold() -> None:
    match = Match(
        host="*.example.com",
        path_prefix=("/static/",),
        path_regex=r"\.js$",
        header=(("x-canary", "1"),),
        methods=frozenset({"GET"}),
    )
    table = table_of(match)
    good = {"target": b"/static/a.js", "host": b"www.example.com", "method": b"GET", "headers": [("X-Canary", "1")]}
    assert picked(table, **good) == 0  # type: ignore[arg-type]
    for key, bad in (
        ("target", b"/static/a.css"),
        ("target", b"/x/a.js"),
        ("host", b"example.com"),
        ("method", b"POST"),
        ("headers", [("X-Canary", "0")]),
    ):
        assert picked(table, **{**good, key: bad}) is None  # type: ignore[arg-type]


def test_the_issue_example() -> None:
    specs = [
        RouteSpec("0", Match(host="api.example.com"), pool="api"),
        RouteSpec("1", Match(host="*.example.com", path_prefix=("/static/",)), pool="static"),
        RouteSpec("2", Match(path_prefix=("/ServiceCenter/",)), deny=403),
        RouteSpec("canary", Match(header=(("x-canary", "1"),), methods=frozenset({"GET", "HEAD"})), pool="canary"),
    ]
    assert check(specs) == []
    table = RouteTable(specs)
    assert [route.name for route in table.routes] == ["0", "1", "2", "canary"]
    assert all(route.requests == 0 and route.target is None for route in table.routes)

    def answer(target: bytes, host: bytes, method: bytes = b"GET", *headers: tuple[str, str]) -> str | int | None:
        route = table.pick(method, target, host, fields_of(*headers))
        return None if route is None else route.pool_name or route.deny

    assert answer(b"/ServiceCenter/", b"api.example.com") == "api"
    assert answer(b"/static/x", b"www.example.com") == "static"
    assert answer(b"/%53erviceCenter/x", b"www.example.com") == 403
    assert answer(b"/", b"www.example.com", b"HEAD", ("X-Canary", "1")) == "canary"
    assert answer(b"/", b"www.example.com", b"POST", ("X-Canary", "1")) is None


# -- check --


def route_spec(
    index: int, match: Match, *, pool: str | None = "p", deny: int | None = None, name: str = ""
) -> RouteSpec:
    return RouteSpec(name=name or str(index), match=match, pool=pool, deny=deny)


def test_invalid_regex() -> None:
    specs = [route_spec(0, Match()), route_spec(1, Match(path_regex="(unclosed"), name="bad")]
    errors = check(specs)
    assert any(error.startswith("route 1 (bad): invalid path_regex '(unclosed'") for error in errors)
    with pytest.raises(RouteError) as raised:
        RouteTable(specs)
    assert raised.value.index == 1
    assert "route 1 (bad)" in raised.value.message


@pytest.mark.parametrize("status", [302, 500, 399, 200])
def test_deny_must_be_4xx(status: int) -> None:
    assert check([route_spec(0, Match(), pool=None, deny=status)]) == [
        f"route 0: deny must be a 4xx status (400-499), not {status}"
    ]


@pytest.mark.parametrize("status", [400, 403, 404, 451, 499])
def test_deny_4xx_is_fine(status: int) -> None:
    assert check([route_spec(0, Match(), pool=None, deny=status)]) == []


def test_pool_or_deny_exactly_one() -> None:
    assert check([route_spec(0, Match(), pool=None)]) == ["route 0: has neither pool nor deny"]
    assert check([route_spec(0, Match(), deny=403)]) == ["route 0: has both pool and deny (one of them)"]


def test_names_are_unique() -> None:
    specs = [
        route_spec(0, Match(host="a"), name="api"),
        route_spec(1, Match(host="b")),
        route_spec(2, Match(host="c"), name="api"),
        route_spec(3, Match(host="d"), name="1"),
    ]
    assert check(specs) == [
        "route 2 (api): the name 'api' is already route 0's",
        "route 3 (1): the name '1' is already route 1's",
    ]


@pytest.mark.parametrize("host", ["*", "*.", "a.*.com", "*.*.com", "", "*example.com"])
def test_malformed_host_patterns(host: str) -> None:
    errors = check([route_spec(0, Match(host=host))])
    assert errors == [f"route 0: host {host!r} is neither a name nor a leading '*.' wildcard"]


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("/%7Euser/", "write '/~user/'"),
        ("/a%2fb", "write '/a/b'"),
        ("/a%2a", "write '/a%2A'"),
        ("/a//b", "write '/a/b'"),
        ("/a?b", "write '/a'"),
        ("api/", "a path starts with '/'"),
    ],
)
def test_prefixes_no_normalized_path_starts_with(prefix: str, problem: str) -> None:
    errors = check([route_spec(0, Match(path_prefix=(prefix,)), pool=None, deny=403)])
    assert len(errors) == 1
    assert errors[0].startswith(f"route 0: path_prefix {prefix!r} never matches")
    assert errors[0].endswith(problem)


def test_normal_prefixes_are_fine() -> None:
    specs = [route_spec(0, Match(path_prefix=("/", "/a/", "/%C3%A9/", "/a%2A", "/.well-known/", "/a/..", "*")))]
    assert check(specs) == []


def shadowed(errors: list[str]) -> dict[int, int]:
    """later index -> the earlier index that `check` says always matches first."""
    found = {}
    for error in errors:
        hit = re.fullmatch(r"route (\d+)(?: \(.*?\))? can never match: route (\d+)(?: \(.*?\))? matches .*", error)
        if hit:
            found[int(hit[1])] = int(hit[2])
    return found


SHADOWING = [
    (Match(), Match(host="a.example.com", path_prefix=("/x",))),
    (Match(host="api.example.com"), Match(host="API.example.com.", methods=frozenset({"GET"}))),
    (Match(host="*.example.com"), Match(host="a.example.com")),
    (Match(host="*.example.com"), Match(host="a.b.example.com")),
    (Match(host="*.example.com"), Match(host="*.b.example.com")),
    (Match(host="*.example.com"), Match(host="*.example.com", path_prefix=("/a",))),
    (Match(path_prefix=("/a",)), Match(path_prefix=("/a/b",))),
    (Match(path_prefix=("/a",)), Match(path_prefix=("/ab", "/a/"))),
    (Match(path_prefix=("/a/", "/b/")), Match(path_prefix=("/b/c", "/a/"))),
    (Match(path_regex="x$"), Match(path_regex="x$", host="h")),
    (Match(header=(("x-a", None),)), Match(header=(("x-a", "1"),))),
    (Match(header=(("x-a", None),)), Match(header=(("x-a", None), ("x-b", "2")))),
    (Match(header=(("x-a", "1"),)), Match(header=(("x-b", None), ("x-a", "1")))),
    (Match(methods=frozenset({"GET", "HEAD"})), Match(methods=frozenset({"GET"}))),
    (Match(methods=frozenset({"GET"})), Match(methods=frozenset({"GET"}), path_prefix=("/",))),
    (
        Match(host="*.example.com", path_prefix=("/s/",), methods=frozenset({"GET", "HEAD"})),
        Match(host="a.example.com", path_prefix=("/s/x",), methods=frozenset({"HEAD"}), header=(("x", "1"),)),
    ),
]


@pytest.mark.parametrize(("earlier", "later"), SHADOWING)
def test_shadowing_is_reported(earlier: Match, later: Match) -> None:
    specs = [route_spec(0, Match(host="unrelated")), route_spec(1, earlier, name="wide"), route_spec(2, later)]
    errors = check(specs)
    assert errors == ["route 2 can never match: route 1 (wide) matches every request it would match first"]
    # and the table agrees on an example request of the later route
    table = RouteTable(specs)
    request = table.pick(
        b"HEAD" if later.methods and "HEAD" in later.methods else b"GET",
        (later.path_prefix[0] if later.path_prefix else "/x").encode(),
        (later.host or "h").replace("*", "w").encode(),
        fields_of(*((name, value or "v") for name, value in later.header)),
    )
    assert request is not None
    assert request.index == 1


NOT_SHADOWING = [
    (Match(path_prefix=("/a/b",)), Match(path_prefix=("/a",))),
    (Match(path_prefix=("/a",)), Match()),
    (Match(path_prefix=("/a",)), Match(path_regex="^/a")),
    (Match(path_prefix=("/a/",)), Match(path_prefix=("/a/x", "/b/x"))),
    (Match(host="a.example.com"), Match(host="*.example.com")),
    (Match(host="*.example.com"), Match(host="example.com")),
    (Match(host="*.b.example.com"), Match(host="*.example.com")),
    (Match(host="*.example.com"), Match(host="a.example.org")),
    (Match(host="a.example.com"), Match()),
    (Match(path_regex="x$"), Match(path_regex="y$")),
    (Match(path_regex="x$"), Match()),
    (Match(header=(("x-a", "1"),)), Match(header=(("x-a", None),))),
    (Match(header=(("x-a", "1"),)), Match(header=(("x-a", "2"),))),
    (Match(header=(("x-a", None),)), Match(header=(("x-b", None),))),
    (Match(methods=frozenset({"GET"})), Match(methods=frozenset({"GET", "HEAD"}))),
    (Match(methods=frozenset({"GET"})), Match()),
]


@pytest.mark.parametrize(("earlier", "later"), NOT_SHADOWING)
def test_no_shadowing_reported_when_the_later_route_can_match(earlier: Match, later: Match) -> None:
    assert check([route_spec(0, earlier), route_spec(1, later)]) == []


def test_empty_match_shadows_every_later_route() -> None:
    specs = [route_spec(0, Match(host="a")), route_spec(1, Match(), name="all"), route_spec(2, Match(host="b"))]
    specs.append(route_spec(3, Match(path_prefix=("/x",))))
    assert shadowed(check(specs)) == {2: 1, 3: 1}


# -- the table against a naive first-match scan --

# Few labels and values, and each condition often absent, so that routes and requests meet often.
MATCH = st.builds(
    Match,
    host=st.sampled_from([None, "a", "ex", "a.ex", "*.ex", "*.a", "*.a.ex"]),
    path_prefix=st.sampled_from([()] * 6 + [("/",), ("/a",), ("/a/",), ("/b/", "/a/b"), ("/A",)]),
    path_regex=st.sampled_from([None] * 12 + ["^/a", "b$", "(?i)^/a/", "/b/"]),
    header=st.sampled_from(
        [()] * 8 + [(("x-a", None),), (("x-a", "1"),), (("x-b", "2"),), (("x-a", None), ("x-b", None))]
    ),
    methods=st.sampled_from([None] * 7 + [frozenset({"GET"}), frozenset({"GET", "HEAD"}), frozenset({"POST"})]),
)
REQUEST_HOST = st.sampled_from([None, b"[::1]:80", b"ex.", b"A.EX:80"]) | st.builds(
    lambda name, spelling: spelling.format(name).encode(),
    st.sampled_from(["a", "ex", "a.ex", "a.ex", "a.a.ex", "b.ex", "b.a", "ex.ex"]),
    st.sampled_from(["{}", "{}", "{}:80", "{}.", "{}"]),
)
TARGET = st.builds(
    lambda path, form: form.encode().replace(b"{}", path),
    PATH,
    st.sampled_from(["{}", "{}", "{}", "{}?q", "http://ex.com{}?q", "*"]),
)
REQUEST = st.tuples(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"get"]),
    TARGET,
    REQUEST_HOST,
    st.lists(st.tuples(st.sampled_from(["X-A", "x-a", "X-B", "Other"]), st.sampled_from(["1", "2", "3"])), max_size=3),
)


def reference_host(host: bytes) -> str:
    text = host.decode().lower()
    text = text[: text.index("]") + 1] if text.startswith("[") else text.split(":")[0]
    return text.removesuffix(".")


def reference_matches(
    match: Match, method: bytes, target: bytes, host: bytes | None, headers: list[tuple[str, str]]
) -> bool:
    """What the issue says, read literally: every condition written holds."""
    if match.host is not None:
        if host is None:
            return False
        name = reference_host(host)
        if match.host.startswith("*."):
            suffix = match.host[2:]
            if not (name.endswith("." + suffix) and len(name) > len(suffix) + 1):
                return False
        elif name != match.host:
            return False
    path = normalize_path(target).decode("latin-1")
    if match.path_prefix and not any(path.startswith(prefix) for prefix in match.path_prefix):
        return False
    if match.path_regex is not None and re.search(match.path_regex, path) is None:
        return False
    for name, value in match.header:
        if not any(field.lower() == name and value in (None, field_value) for field, field_value in headers):
            return False
    return match.methods is None or method.decode() in match.methods


@settings(max_examples=200, deadline=None)
@given(st.lists(MATCH, max_size=8), st.lists(REQUEST, min_size=1, max_size=10))
def test_table_picks_as_a_linear_first_match_scan(
    matches: list[Match], requests: list[tuple[bytes, bytes, bytes | None, list[tuple[str, str]]]]
) -> None:
    specs = specs_of(*matches)
    table = RouteTable(specs)
    unreachable = shadowed(check(specs))
    for method, target, host, headers in requests:
        expected = next(
            (index for index, match in enumerate(matches) if reference_matches(match, method, target, host, headers)),
            None,
        )
        got = picked(table, target, host, method, headers)
        assert got == expected
        assert got not in unreachable  # check's shadowing is sound: a route it rules out is never picked


def test_the_hosts_a_table_remembers_are_bounded_and_change_no_answer() -> None:
    table = RouteTable([RouteSpec("api", Match(host="api.example.com"), pool="api")])
    for index in range(routing.SEEN_HOSTS * 2 + 7):  # every Host new: the memory fills and empties
        assert table.pick(b"GET", b"/", b"h%d.example.com" % index, []) is None
        assert len(table._seen) <= routing.SEEN_HOSTS
    assert table.pick(b"GET", b"/", b"API.example.com:8080", []) is table.routes[0]
    assert table.pick(b"GET", b"/", b"API.example.com:8080", []) is table.routes[0]  # remembered
