"""The config file: every error names the file, the line and the key path; defaults; `lbproxy check`.

Sans-IO: `parse()` on YAML texts and `load()` on files in tmp_path, except the CLI tests, which run
`python -m lbproxy check` in a subprocess as a user would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lbproxy.config import (
    Address,
    AdminConfig,
    Config,
    ConfigError,
    HealthConfig,
    ListenerConfig,
    ServerConfig,
    load,
    parse,
    resolve,
)

REPO = Path(__file__).resolve().parent.parent
ADDRESS_EXPECTED = "expected HOST:PORT (IPv6 as [::1]:80)"

# The smallest valid config; tests below change one thing in it (line numbers are given in comments).
MINIMAL = """\
listeners:
  - name: web
    bind: 127.0.0.1:8080
    pool: farm
pools:
  farm:
    servers:
      - name: a
        address: 10.0.0.1:80
"""


def ok(text: str, environ: dict[str, str] | None = None) -> Config:
    return parse(textwrap.dedent(text), "lbproxy.yaml", environ={} if environ is None else environ)


def errors(text: str, environ: dict[str, str] | None = None) -> list[str]:
    """Every problem `parse` reports for `text`, as the user sees them."""
    with pytest.raises(ConfigError) as caught:
        ok(text, environ)
    return [str(problem) for problem in caught.value.problems]


def with_servers(*lines: str) -> str:
    """MINIMAL with the server list replaced by `lines` (the first one on line 8)."""
    return MINIMAL.split("      - name: a\n")[0] + "".join(f"{line}\n" for line in lines)


# -- YAML and keys ------------------------------------------------------------------------------


def test_minimal_config_parses() -> None:
    config = ok(MINIMAL)
    assert config.listeners == (ListenerConfig(name="web", bind=Address("127.0.0.1", 8080), pool="farm"),)
    assert config.pools["farm"].servers == (ServerConfig(name="a", address=Address("10.0.0.1", 80)),)
    assert config.summary() == "lbproxy.yaml: OK: 1 listener, 1 pool, 1 server"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            MINIMAL + "       ratio: 2\n",
            "10: invalid YAML: the indentation of this line does not match the lines above it",
            id="key indented less than its siblings",
        ),
        pytest.param(
            MINIMAL.replace("    pool: farm", "   pool: farm"),
            "4: invalid YAML: the indentation of this line does not match the lines above it",
            id="key indented less, in a list item",
        ),
        pytest.param(
            MINIMAL.replace("    bind: ", "\tbind: "),
            "3: invalid YAML: this line is indented with a tab (column 1): YAML indents with spaces only",
            id="tab indentation",
        ),
        pytest.param(
            MINIMAL.replace("pool: farm", "pool:\tfarm"),
            "4: invalid YAML: a tab character in column 10: YAML takes spaces here, not tabs",
            id="tab after a key",
        ),
        pytest.param(
            MINIMAL.replace("name: a", 'name: "a'),
            '8: invalid YAML: the quote " in column 15 is never closed',
            id="unclosed quote",
        ),
        pytest.param(
            MINIMAL + "    health: {type: http, path: /\n",
            "10: invalid YAML: the '{' in column 13 is never closed with '}'",
            id="unclosed brace at the end",
        ),
        pytest.param(
            MINIMAL.split("    servers:")[0] + "    servers: [{name: a, address: 10.0.0.1:80}\n    retries: 2\n",
            "8: invalid YAML: expected ',' or ']' in column 5: the list opened with '[' on line 7 is not closed, "
            "or two of its items have no ',' between them",
            id="unclosed bracket before more lines",
        ),
        pytest.param(
            MINIMAL.replace("    servers:\n", "    servers: [\n"),
            "8: invalid YAML: a '- ' list item inside [...] or {...}: separate their items with ',' instead",
            id="block list item in a bracket",
        ),
        pytest.param(
            MINIMAL.replace("pool: farm", "pool: farm: other"),
            "4: invalid YAML: a second ': ' on this line (column 15): put a value that contains ': ' in quotes",
            id="key: value: value",
        ),
        pytest.param(
            MINIMAL.replace("    pool: farm", "    pool farm"),
            "4: invalid YAML: this line has no ': ' between its key and its value (write `key: value`)",
            id="key without a colon",
        ),
        pytest.param(
            MINIMAL.replace("  - name: web", "  - name web"),
            "3: invalid YAML: line 2 has no ':' after its key, so this line continues it; add the ':' there",
            id="first key without a colon",
        ),
        pytest.param(
            MINIMAL.replace("    pool: farm", "    pool: farm\n      mode: http"),
            "5: invalid YAML: this line is indented more than the key above it, so it continues that key's value",
            id="key indented under a value",
        ),
        pytest.param(
            MINIMAL + "    - name: b\n      address: 10.0.0.2:80\n",
            "10: invalid YAML: a list item ('-') where a mapping key was expected; check the indentation "
            "(the items of one list start in the same column)",
            id="list item at the wrong level",
        ),
        pytest.param(
            MINIMAL + "        - name: b\n",
            "10: invalid YAML: a list item ('-') where a mapping key was expected; check the indentation "
            "(the items of one list start in the same column)",
            id="list item inside a list item",
        ),
        pytest.param(
            MINIMAL.replace("    servers:\n", "    servers: - name: a\n"),
            "7: invalid YAML: a list item ('- ', column 14) cannot start on its key's line: put it on the next line",
            id="list item on its key's line",
        ),
        pytest.param(
            MINIMAL.replace("pool: farm", 'pool: "farm" x'),
            "4: invalid YAML: unexpected text after the value (column 18): put the whole value in quotes",
            id="text after a quoted value",
        ),
        pytest.param(
            MINIMAL + '    health: {type: http, path: "C:\\path"}\n',
            "10: invalid YAML: '\\p' is not an escape sequence in a double-quoted value (column 35): "
            "use single quotes around a value with backslashes",
            id="backslash in double quotes",
        ),
    ],
)
def test_yaml_syntax_errors_say_what_is_wrong_in_words(text: str, expected: str) -> None:
    assert errors(text) == [f"lbproxy.yaml:{expected}"]


def test_a_control_character_is_located() -> None:
    text = MINIMAL.replace("name: a", "name: a\x07")
    assert errors(text) == ["lbproxy.yaml:8: invalid YAML: the control character #x0007 (column 16) is not allowed"]


def test_empty_file() -> None:
    assert errors("") == ["lbproxy.yaml:1: the file is empty: it needs 'listeners' and 'pools'"]


def test_unknown_top_level_key() -> None:
    text = MINIMAL.replace("listeners:", "listners:")
    assert errors(text) == [
        "lbproxy.yaml:1: listners: unknown key "
        "(expected one of: admin, listeners, pools, state_file, shutdown_timeout, log_format, cluster)",
        "lbproxy.yaml:1: missing required key 'listeners'",
    ]


def test_unknown_nested_key() -> None:
    text = MINIMAL + "        weight: 2\n"
    assert errors(text) == [
        "lbproxy.yaml:10: pools.farm.servers[0].weight: unknown key "
        "(expected one of: name, address, ratio, backup, max_connections)",
    ]


def test_unknown_key_in_health_block() -> None:
    text = MINIMAL + "    health:\n      intreval: 2s\n"
    assert errors(text) == [
        "lbproxy.yaml:11: pools.farm.health.intreval: unknown key "
        "(expected one of: type, path, method, host, expect_status, expect_body, interval, timeout, rise, fall, start)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            MINIMAL.replace("    pool: farm\n", "    pool: farm\n    retries: 3\n"),
            "5: listeners[0].retries: unknown key 'retries' here; it belongs under pools.<name>",
            id="retries under a listener",
        ),
        pytest.param(
            MINIMAL + "        health: {type: tcp}\n",
            "10: pools.farm.servers[0].health: unknown key 'health' here; it belongs under pools.<name>",
            id="health under a server",
        ),
        pytest.param(
            MINIMAL + "        timeouts: {connect: 1s}\n",
            "10: pools.farm.servers[0].timeouts: unknown key 'timeouts' here; "
            "it belongs under listeners[] or under pools.<name>",
            id="a key two places take",
        ),
        pytest.param(
            MINIMAL + "    health:\n      connect: 1s\n",
            "11: pools.farm.health.connect: unknown key 'connect' here; it belongs under pools.<name>.timeouts",
            id="a nested block's key",
        ),
        pytest.param(
            MINIMAL.replace("pools:\n", "shutdown_timeout: 5s\npools:\n").replace(
                "    pool: farm\n", "    pool: farm\n    log_format: json\n"
            ),
            "5: listeners[0].log_format: unknown key 'log_format' here; it belongs at the top level",
            id="a top-level key under a listener",
        ),
        pytest.param(
            MINIMAL.replace("pools:\n", "servers: []\npools:\n"),
            "5: servers: unknown key 'servers' here; it belongs under pools.<name>",
            id="a pool's key at the top level",
        ),
        pytest.param(
            MINIMAL.replace("pools:\n  farm:\n    servers:\n", "pools:\n  servers:\n").replace("pool: farm", "pool: x"),
            "7: pools.servers: 'servers' is not a pool: it belongs under pools.<name> (a pool is named first)",
            id="a pool's key where its name goes",
        ),
    ],
)
def test_a_key_at_the_wrong_level_says_where_it_belongs(text: str, expected: str) -> None:
    assert f"lbproxy.yaml:{expected}" in errors(text)


def test_missing_required_key() -> None:
    text = MINIMAL.replace("    pool: farm\n", "")
    assert errors(text) == ["lbproxy.yaml:2: listeners[0]: missing required key 'pool'"]


# -- addresses ----------------------------------------------------------------------------------


def test_address_without_port_names_file_line_and_key_path() -> None:
    text = with_servers(
        "      - {name: a, address: 10.0.0.1:80}",
        "      - {name: b, address: 10.0.0.2:80}",
        "      - {name: c, address: 10.0.0.1}",
    )
    assert errors(text) == [f"lbproxy.yaml:10: pools.farm.servers[2].address: {ADDRESS_EXPECTED}, got '10.0.0.1'"]


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("'::1:80'", "got '::1:80': put an IPv6 address in brackets"),
        ("'2001:db8::1:80'", "got '2001:db8::1:80': put an IPv6 address in brackets"),
        ("'[::1]80'", "got '[::1]80': '::1]80' is not an IPv6 address"),
        ("'[not:v6]:80'", "got '[not:v6]:80': 'not:v6' is not an IPv6 address"),
        ("10.0.0.1:http", "got '10.0.0.1:http'"),
        ("10.0.0.1:-1", "got '10.0.0.1:-1'"),
        ("'bad_host!:80'", "got 'bad_host!:80': 'bad_host!' is not an IPv4 address or host name"),
        ("8080", "got 8080"),
    ],
)
def test_bad_server_address(address: str, message: str) -> None:
    text = with_servers("      - name: a", f"        address: {address}")
    assert errors(text) == [f"lbproxy.yaml:9: pools.farm.servers[0].address: {ADDRESS_EXPECTED}, {message}"]


@pytest.mark.parametrize(
    ("written", "replaced", "expected"),
    [
        ("10.0.0.1:80", "10.0.0.1:80800", "9: pools.farm.servers[0].address: port 80800 is out of range 1-65535"),
        ("10.0.0.1:80", "10.0.0.1:0", "9: pools.farm.servers[0].address: port 0 is out of range 1-65535"),
        ("10.0.0.1:80", "'[::1]:65536'", "9: pools.farm.servers[0].address: port 65536 is out of range 1-65535"),
        # a bind may say port 0: the kernel picks one
        ("127.0.0.1:8080", "127.0.0.1:80800", "3: listeners[0].bind: port 80800 is out of range 0-65535"),
        ("pools:", "admin: {bind: 127.0.0.1:99999}\npools:", "5: admin.bind: port 99999 is out of range 0-65535"),
    ],
)
def test_a_port_out_of_range_says_so(written: str, replaced: str, expected: str) -> None:
    assert errors(MINIMAL.replace(written, replaced)) == [f"lbproxy.yaml:{expected}"]


def test_a_server_name_that_does_not_resolve_is_an_error_when_asked() -> None:
    # RFC 6761 §6.4: names under .invalid never resolve.
    text = with_servers(
        "      - {name: a, address: srv.example.invalid:80}",
        "      - {name: b, address: localhost:80}",
        "      - {name: c, address: 10.0.0.1:80}",
        "      - {name: d, address: srv.example.invalid:81}",
    )
    with pytest.raises(ConfigError) as caught:
        parse(text, "lbproxy.yaml", {}, resolve=True)
    problems = [(p.line, p.key, p.message.split(": ")[0]) for p in caught.value.problems]
    assert problems == [
        (8, "pools.farm.servers[0].address", "cannot resolve 'srv.example.invalid'"),
        (11, "pools.farm.servers[3].address", "cannot resolve 'srv.example.invalid'"),
    ]
    # Without `resolve` (the runtime's own reads, `check --no-resolve`) nothing is looked up.
    assert len(parse(text, "lbproxy.yaml", {}).pools["farm"].servers) == 4


def test_resolve_gives_an_address_for_a_name_and_keeps_an_address() -> None:
    assert resolve(Address("localhost", 80)) in ("127.0.0.1", "::1")
    assert resolve(Address("10.0.0.1", 80)) == "10.0.0.1"
    assert resolve(Address("::1", 80)) == "::1"
    with pytest.raises(socket.gaierror):
        resolve(Address("srv.example.invalid", 80))


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("10.0.0.1:80", Address("10.0.0.1", 80)),
        ("app-1.example.com:8080", Address("app-1.example.com", 8080)),
        ("'[::1]:80'", Address("::1", 80)),
        ("'[2001:db8::7]:65535'", Address("2001:db8::7", 65535)),
    ],
)
def test_good_server_address(written: str, expected: Address) -> None:
    config = ok(with_servers("      - name: a", f"        address: {written}"))
    assert config.pools["farm"].servers[0].address == expected


def test_ipv6_address_prints_with_brackets() -> None:
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("10.0.0.1", 80)) == "10.0.0.1:80"


def test_bind_port_zero_is_allowed_for_listeners_only() -> None:
    config = ok(MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0"))
    assert config.listeners[0].bind == Address("127.0.0.1", 0)


# -- durations and other values -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("2", "expected a duration such as 500ms, 2s or 1m, got 2"),
        ("2x", "expected a duration such as 500ms, 2s or 1m, got '2x'"),
        ("2 s", "expected a duration such as 500ms, 2s or 1m, got '2 s'"),
        ("0s", "expected a duration above zero, got '0s'"),
    ],
)
def test_bad_duration(written: str, message: str) -> None:
    text = MINIMAL + f"    health:\n      interval: {written}\n"
    assert errors(text) == [f"lbproxy.yaml:11: pools.farm.health.interval: {message}"]


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), ("1h", 3600.0)],
)
def test_durations(written: str, seconds: float) -> None:
    config = ok(MINIMAL + f"    health:\n      timeout: {written}\n")
    assert config.pools["farm"].health.timeout == seconds


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("policy: fastest", "pools.farm.policy: expected one of round_robin, least_connections, ratio, "
         "dynamic_ratio, got 'fastest'"),
        ("retries: 11", "pools.farm.retries: expected an integer from 0 to 10, got 11"),
        ("retries: many", "pools.farm.retries: expected an integer from 0 to 10, got 'many'"),
        ("retries: true", "pools.farm.retries: expected an integer from 0 to 10, got True"),
    ],
)  # fmt: skip
def test_bad_pool_values(line: str, message: str) -> None:
    text = MINIMAL.replace("  farm:\n", f"  farm:\n    {line}\n")
    assert errors(text) == [f"lbproxy.yaml:7: {message}"]


def test_bad_ratio_and_backup() -> None:
    text = with_servers(
        "      - name: a",
        "        address: 10.0.0.1:80",
        "        ratio: 0",
        "        backup: maybe",
    )
    assert errors(text) == [
        "lbproxy.yaml:10: pools.farm.servers[0].ratio: expected an integer from 1 to 256, got 0",
        "lbproxy.yaml:11: pools.farm.servers[0].backup: expected true or false, got 'maybe'",
    ]


# -- references and duplicates ------------------------------------------------------------------


def test_listener_refers_to_unknown_pool() -> None:
    text = MINIMAL.replace("pool: farm", "pool: frm")
    assert errors(text) == ["lbproxy.yaml:4: listeners[0].pool: no pool named 'frm' (pools: farm)"]


def test_unknown_backup_pool() -> None:
    text = MINIMAL.replace("  farm:\n", "  farm:\n    backup_pool: dr\n")
    assert errors(text) == ["lbproxy.yaml:7: pools.farm.backup_pool: no pool named 'dr' (pools: farm)"]


def test_backup_pool_loop_is_reported_once() -> None:
    text = """\
        listeners:
          - {name: web, bind: 127.0.0.1:8080, pool: a}
        pools:
          a:
            backup_pool: b
            servers: [{name: a1, address: 10.0.0.1:80}]
          b:
            backup_pool: c
            servers: [{name: b1, address: 10.0.0.2:80}]
          c:
            backup_pool: a
            servers: [{name: c1, address: 10.0.0.3:80}]
        """
    assert errors(text) == ["lbproxy.yaml:5: pools.a.backup_pool: backup pools form a loop: a -> b -> c -> a"]


def test_backup_pool_of_itself() -> None:
    text = MINIMAL.replace("  farm:\n", "  farm:\n    backup_pool: farm\n")
    assert errors(text) == ["lbproxy.yaml:7: pools.farm.backup_pool: backup pools form a loop: farm -> farm"]


def test_backup_pool_chain_leading_into_a_loop_reports_the_loop_only() -> None:
    text = """\
        listeners:
          - {name: web, bind: 127.0.0.1:8080, pool: a}
        pools:
          a:
            backup_pool: b
            servers: [{name: a1, address: 10.0.0.1:80}]
          b:
            backup_pool: c
            servers: [{name: b1, address: 10.0.0.2:80}]
          c:
            backup_pool: b
            servers: [{name: c1, address: 10.0.0.3:80}]
        """
    assert errors(text) == ["lbproxy.yaml:8: pools.b.backup_pool: backup pools form a loop: b -> c -> b"]


def test_backup_pool_chain_without_loop_is_fine() -> None:
    text = """\
        listeners:
          - {name: web, bind: 127.0.0.1:8080, pool: a}
        pools:
          a:
            backup_pool: b
            servers: [{name: a1, address: 10.0.0.1:80}]
          b:
            servers: [{name: b1, address: 10.0.0.2:80}]
        """
    assert ok(text).pools["a"].backup_pool == "b"


def test_duplicate_listener_names() -> None:
    text = MINIMAL.replace(
        "pools:\n",
        "  - name: web\n    bind: 127.0.0.1:8081\n    pool: farm\npools:\n",
    )
    assert errors(text) == ["lbproxy.yaml:5: listeners[1].name: duplicate listener name 'web'"]


def test_duplicate_listener_binds() -> None:
    text = MINIMAL.replace(
        "pools:\n",
        "  - name: api\n    bind: 127.0.0.1:8080\n    pool: farm\npools:\n",
    )
    assert errors(text) == ["lbproxy.yaml:6: listeners[1].bind: 127.0.0.1:8080 is already bound by listener 'web'"]


def test_a_wildcard_bind_clashes_with_a_specific_address_on_its_port() -> None:
    text = MINIMAL.replace(
        "pools:\n",
        "  - name: api\n    bind: 0.0.0.0:8080\n    pool: farm\n  - name: other\n    bind: 0.0.0.0:8081\n"
        "    pool: farm\npools:\n",
    )
    assert errors(text) == [
        "lbproxy.yaml:6: listeners[1].bind: 0.0.0.0:8080 is already bound by listener 'web' (127.0.0.1:8080)"
    ]


def test_several_listeners_on_port_zero_are_not_duplicates() -> None:
    text = MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0").replace(
        "pools:\n",
        "  - name: api\n    bind: 127.0.0.1:0\n    pool: farm\npools:\n",
    )
    assert [listener.name for listener in ok(text).listeners] == ["web", "api"]


def test_duplicate_server_names_in_a_pool() -> None:
    text = with_servers(
        "      - {name: a, address: 10.0.0.1:80}",
        "      - {name: b, address: 10.0.0.2:80}",
        "      - {name: a, address: 10.0.0.3:80}",
    )
    assert errors(text) == ["lbproxy.yaml:10: pools.farm.servers[2].name: duplicate server name 'a' in this pool"]


def test_same_server_name_in_two_pools_is_fine() -> None:
    text = MINIMAL + "  dr:\n    servers:\n      - {name: a, address: 10.0.0.9:80}\n"
    assert sorted(ok(text).pools) == ["dr", "farm"]


def test_duplicate_key() -> None:
    text = MINIMAL + "        address: 10.0.0.2:80\n"
    assert errors(text) == ["lbproxy.yaml:10: pools.farm.servers[0].address: duplicate key"]


# -- environment variables ----------------------------------------------------------------------


def test_unset_environment_variable() -> None:
    text = MINIMAL.replace("  farm:\n", "  farm:\n    retries: ${R}\n")
    assert errors(text) == ["lbproxy.yaml:7: pools.farm.retries: environment variable R is not set"]


def test_environment_variable_is_typed_after_substitution() -> None:
    text = MINIMAL.replace("  farm:\n", "  farm:\n    retries: ${R}\n")
    retries = ok(text, {"R": "3"}).pools["farm"].retries
    assert retries == 3
    assert type(retries) is int


def test_quoted_environment_variable_stays_a_string() -> None:
    text = MINIMAL.replace("  farm:\n", '  farm:\n    retries: "${R}"\n')
    assert errors(text, {"R": "3"}) == ["lbproxy.yaml:7: pools.farm.retries: expected an integer from 0 to 10, got '3'"]


def test_environment_variable_default() -> None:
    text = MINIMAL.replace("  farm:\n", "  farm:\n    retries: ${R:-4}\n")
    assert ok(text).pools["farm"].retries == 4
    assert ok(text, {"R": "1"}).pools["farm"].retries == 1


def test_environment_variables_inside_a_value() -> None:
    text = MINIMAL.replace("10.0.0.1:80", "${HOST}:${PORT:-80}")
    assert ok(text, {"HOST": "app.example.com"}).pools["farm"].servers[0].address == Address("app.example.com", 80)


def test_admin_token_from_environment() -> None:
    text = "admin:\n  bind: 127.0.0.1:9191\n  token: ${T}\n" + MINIMAL
    assert ok(text, {"T": "s3cret-token"}).admin == AdminConfig(Address("127.0.0.1", 9191), "s3cret-token")


@pytest.mark.parametrize("environ", [{}, {"T": ""}])
def test_empty_admin_token_means_none(environ: dict[str, str]) -> None:
    text = "admin:\n  token: ${T:-}\n" + MINIMAL
    admin = ok(text, environ).admin
    assert admin is not None
    assert admin.token is None


# -- several errors -----------------------------------------------------------------------------


def test_several_errors_are_all_reported_sorted_by_line() -> None:
    # Pools are validated before listeners and backup pools last: the report is still in file order.
    text = """\
        listeners:
          - name: web
            bind: 127.0.0.1:8080
            pool: nowhere
            mode: udp
        pools:
          farm:
            backup_pool: dr
            servers:
              - {name: a, address: 10.0.0.1}
              - {name: a, address: 10.0.0.2:80}
            health:
              interval: 2
        """
    assert errors(text) == [
        "lbproxy.yaml:4: listeners[0].pool: no pool named 'nowhere' (pools: farm)",
        "lbproxy.yaml:5: listeners[0].mode: expected one of http, tcp, got 'udp'",
        "lbproxy.yaml:8: pools.farm.backup_pool: no pool named 'dr' (pools: farm)",
        f"lbproxy.yaml:10: pools.farm.servers[0].address: {ADDRESS_EXPECTED}, got '10.0.0.1'",
        "lbproxy.yaml:11: pools.farm.servers[1].name: duplicate server name 'a' in this pool",
        "lbproxy.yaml:13: pools.farm.health.interval: expected a duration such as 500ms, 2s or 1m, got 2",
    ]


def test_config_error_message_lists_every_problem() -> None:
    text = MINIMAL.replace("pool: farm", "pool: frm").replace("10.0.0.1:80", "10.0.0.1")
    with pytest.raises(ConfigError) as caught:
        ok(text)
    assert str(caught.value) == (
        "lbproxy.yaml:4: listeners[0].pool: no pool named 'frm' (pools: farm)\n"
        f"lbproxy.yaml:9: pools.farm.servers[0].address: {ADDRESS_EXPECTED}, got '10.0.0.1'"
    )


# -- files: load() and the maintenance page -----------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def with_page(page: str, mode: str = "http") -> str:
    return MINIMAL.replace("    pool: farm\n", f"    pool: farm\n    mode: {mode}\n    maintenance_page: {page}\n")


def test_load_names_the_file_as_given(tmp_path: Path) -> None:
    path = write(tmp_path / "lb.yaml", MINIMAL.replace("10.0.0.1:80", "10.0.0.1"))
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:9: pools.farm.servers[0].address: {ADDRESS_EXPECTED}, got '10.0.0.1'"
    ]


def load_errors(path: Path, resolve: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, environ={}, resolve=resolve)
    return [str(problem) for problem in caught.value.problems]


def test_load_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert load_errors(path) == [f"cannot read {path}: No such file or directory"]


def test_load_of_a_folder(tmp_path: Path) -> None:
    assert load_errors(tmp_path) == [f"cannot read {tmp_path}: Is a directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_load_of_an_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path / "lbproxy.yaml", MINIMAL)
    path.chmod(0)
    assert load_errors(path) == [f"cannot read {path}: Permission denied"]


def test_load_of_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.yaml"
    path.write_bytes(MINIMAL.encode().replace(b"name: a", b"name: \xe9"))
    assert load_errors(path) == [f"{path}:8: the file is not UTF-8 text: byte 0xe9 cannot be read as UTF-8"]


def test_load_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBPROXY_TEST_RETRIES", "5")
    path = write(tmp_path / "lb.yaml", MINIMAL.replace("  farm:\n", "  farm:\n    retries: ${LBPROXY_TEST_RETRIES}\n"))
    assert load(path).pools["farm"].retries == 5


def test_maintenance_page_is_relative_to_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "lbproxy"
    page = write(folder / "pages" / "maintenance.html", "<p>back soon</p>")
    path = write(folder / "lbproxy.yaml", with_page("pages/maintenance.html"))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert load(path, environ={}).listeners[0].maintenance_page == page.resolve()
    assert load("etc/lbproxy/lbproxy.yaml", environ={}).listeners[0].maintenance_page == page.resolve()


def test_maintenance_page_absolute_path(tmp_path: Path) -> None:
    page = write(tmp_path / "pages" / "down.html", "<p>down</p>")
    path = write(tmp_path / "conf" / "lbproxy.yaml", with_page(str(page)))
    assert load(path, environ={}).listeners[0].maintenance_page == page


def test_missing_maintenance_page(tmp_path: Path) -> None:
    path = write(tmp_path / "lbproxy.yaml", with_page("missing.html"))
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:6: listeners[0].maintenance_page: no such file: {tmp_path.resolve() / 'missing.html'}"
    ]


def test_maintenance_page_on_a_tcp_listener_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "maintenance.html", "<p>back soon</p>")
    path = write(tmp_path / "lbproxy.yaml", with_page("maintenance.html", mode="tcp"))
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:6: listeners[0].maintenance_page: only http listeners serve a maintenance page"
    ]


# -- defaults and YAML features -----------------------------------------------------------------


def test_defaults_are_filled_in() -> None:
    config = ok(MINIMAL)
    assert config.admin is None  # no admin block, no admin server
    (listener,) = config.listeners
    assert listener.mode == "http"
    assert listener.maintenance_page is None
    pool = config.pools["farm"]
    assert pool.policy == "round_robin"
    assert pool.retries == 2
    assert pool.backup_pool is None
    assert pool.servers[0].ratio == 1
    assert pool.servers[0].backup is False
    assert pool.health == HealthConfig()
    assert pool.health.type == "none"


def test_health_block_without_type_is_a_tcp_check_with_defaults() -> None:
    health = ok(MINIMAL + "    health:\n      rise: 1\n").pools["farm"].health
    assert health.type == "tcp"
    assert (health.path, health.expect_status) == ("/", (200, 399))
    assert (health.interval, health.timeout, health.rise, health.fall) == (2.0, 1.0, 1, 3)


def test_health_defaults_values() -> None:
    health = ok(MINIMAL + "    health: {type: http}\n").pools["farm"].health
    assert health == HealthConfig(
        type="http", path="/", expect_status=(200, 399), interval=2.0, timeout=1.0, rise=2, fall=3
    )


def test_full_health_block() -> None:
    text = MINIMAL + textwrap.indent(
        "health:\n  type: http\n  path: /ServiceCenter/\n  method: OPTIONS\n  host: app.example\n"
        "  expect_status: 200-299\n  expect_body: OK\n  interval: 500ms\n  timeout: 250ms\n"
        "  rise: 3\n  fall: 5\n  start: down\n",
        "    ",
    )
    assert ok(text).pools["farm"].health == HealthConfig(
        type="http",
        path="/ServiceCenter/",
        method="OPTIONS",
        host="app.example",
        expect_status=(200, 299),
        expect_body="OK",
        interval=0.5,
        timeout=0.25,
        rise=3,
        fall=5,
        start="down",
    )


def test_yaml_merge_keys() -> None:
    text = """\
        listeners:
          - {name: web, bind: 127.0.0.1:8080, pool: farm}
        pools:
          farm:
            health: &checks {type: http, path: /health, interval: 5s}
            servers:
              - &server {name: a, address: 10.0.0.1:80, ratio: 3}
          dr:
            health:
              <<: *checks
              fall: 5
            servers:
              - <<: *server
        """
    config = ok(text)
    assert config.pools["dr"].health == HealthConfig(type="http", path="/health", interval=5.0, fall=5)
    assert config.pools["dr"].servers == (ServerConfig("a", Address("10.0.0.1", 80), ratio=3),)


def test_yaml_merge_keys_can_be_overridden() -> None:
    # YAML's merge key: the mapping's own keys win over the merged ones. That is what merge keys are
    # for: a server template with a different name and address per server.
    text = """\
        listeners:
          - {name: web, bind: 127.0.0.1:8080, pool: farm}
        pools:
          farm:
            servers:
              - &server {name: a, address: 10.0.0.1:80, ratio: 3}
              - <<: *server
                name: b
                address: 10.0.0.2:80
        """
    assert ok(text).pools["farm"].servers == (
        ServerConfig("a", Address("10.0.0.1", 80), ratio=3),
        ServerConfig("b", Address("10.0.0.2", 80), ratio=3),
    )


# -- the shipped configs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lbproxy.yaml", "demo.yaml"])
def test_shipped_config_loads(name: str) -> None:
    path = REPO / "config" / name
    if not path.exists():
        pytest.skip(f"{path} is not there yet")
    config = load(path, environ={})
    assert config.listeners
    assert config.pools


# -- lbproxy check ------------------------------------------------------------------------------


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_check_command_on_a_good_config(tmp_path: Path) -> None:
    path = write(tmp_path / "lbproxy.yaml", MINIMAL)
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: OK: 1 listener, 1 pool, 1 server\n"


def test_check_command_on_a_wrong_address(tmp_path: Path) -> None:
    path = write(tmp_path / "lbproxy.yaml", MINIMAL.replace("10.0.0.1:80", "10.0.0.1").replace("pool: farm", "pool: x"))
    result = check(path)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert f"{path}:4: listeners[0].pool: no pool named 'x' (pools: farm)" in lines
    assert f"{path}:9: pools.farm.servers[0].address: {ADDRESS_EXPECTED}, got '10.0.0.1'" in lines
    assert "OK" not in result.stdout


@pytest.mark.parametrize("name", ["lbproxy.yaml", "demo.yaml"])
def test_check_command_on_shipped_config(name: str) -> None:
    path = REPO / "config" / name
    if not path.exists():
        pytest.skip(f"{path} is not there yet")
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert ": OK: " in result.stdout


def test_a_head_probe_cannot_expect_a_body() -> None:
    text = MINIMAL + "    health: {type: http, method: HEAD, expect_body: OK}\n"
    assert errors(text) == ["lbproxy.yaml:10: pools.farm.health.expect_body: a HEAD probe gets no body to look into"]


def test_min_up_above_the_primaries_is_refused() -> None:
    text = MINIMAL + "    min_up: 3\n"
    assert errors(text) == [
        "lbproxy.yaml:10: pools.farm.min_up: min_up 3 is more than the pool's 1 primary servers: "
        "the backups would always serve"
    ]


def test_admin_bind_clashing_with_a_listener() -> None:
    text = "admin:\n  bind: 0.0.0.0:8080\n" + MINIMAL
    assert errors(text) == ["lbproxy.yaml:2: admin.bind: 0.0.0.0:8080 is already bound by listener 'web'"]


def test_null_switches_optional_keys_off() -> None:
    text = MINIMAL + "    slow_start: ${S:-}\n    max_down_fraction: ~\n"
    pool = ok(text).pools["farm"]
    assert pool.slow_start is None
    assert pool.max_down_fraction is None


def test_state_file_must_name_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    path = tmp_path / "lbproxy.yaml"
    path.write_text("state_file: state\n" + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:1: state_file: {tmp_path / 'state'} is a folder: name a file in it"
    ]
