"""`lbproxy ctl`: the admin API from a shell, for operators in the middle of an incident.

Standard library only (urllib), so that it starts fast and runs wherever lbproxy is installed. Exit
codes: 0 done, 1 the API refused (the message says why), 2 the admin server could not be reached.
Every call carries `X-Lbproxy-Admin: 1`, which the API wants of writes without a token (a web page of
another origin cannot send it; see lbproxy.admin), and the bearer token when there is one.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ADMIN = "http://127.0.0.1:9090"  # admin.bind of the example config
ADMIN_VARIABLE = "LBPROXY_ADMIN"  # overrides DEFAULT_ADMIN
TOKEN_VARIABLE = "LBPROXY_ADMIN_TOKEN"  # the default --token
ADMIN_HEADER = "X-Lbproxy-Admin"  # lbproxy.admin.ADMIN_HEADER (not imported: ctl loads no aiohttp)


def run(
    admin: str,
    token: str | None,
    action: str,
    pool: str | None,
    server: str | None,
    local: bool = False,
    percent: int | None = None,
    definition: dict[str, Any] | None = None,
) -> int:
    base = admin.rstrip("/")
    try:
        if action == "status":
            # Two readings a second apart give the rates.
            first = _call(base, "GET", "/api/v1/pools", token)["pools"]
            started = time.monotonic()
            time.sleep(RATE_WINDOW)
            second = _call(base, "GET", "/api/v1/pools", token)["pools"]
            print(status_table(second, first, time.monotonic() - started))
            return 0
        if action == "reload":
            _call(base, "POST", "/api/v1/reload", token)
            print("reloaded")
            return 0
        if action == "cluster":
            state = _call(base, "GET", "/api/v1/cluster", token)
            if not state.get("enabled"):
                print(f"lbproxy ctl: {state.get('message', 'no cluster')}", file=sys.stderr)
                return 1
            print(cluster_table(state))
            return 0
        assert pool is not None
        assert server is not None
        query = "?local=1" if local else ""
        if action in ("add-server", "remove-server"):
            servers = f"/api/v1/pools/{_quote(pool)}/servers"
            if definition is not None:
                answer = _call(base, "POST", servers + query, token, definition)
            else:
                answer = _call(base, "DELETE", f"{servers}/{_quote(server)}{query}", token)
            done = "added" if definition is not None else "removed"
            on = "every node of the fleet" if answer.get("applied_on") == "fleet" else "this node only"
            print(f"{pool}/{server}: {done} on {on}")
            return 0
        where = f"/api/v1/pools/{_quote(pool)}/servers/{_quote(server)}/{action}" + query
        state = _call(base, "POST", where, token, {"percent": percent} if action == "weight" else None)
    except ApiError as error:
        print(f"lbproxy ctl: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        reason = getattr(error, "reason", error)
        print(f"lbproxy ctl: cannot reach the admin server at {admin}: {reason}", file=sys.stderr)
        return 2
    on = " (every node of the fleet)" if state.get("applied_on") == "fleet" else " (this node only)" if local else ""
    weight = f", weight {state['weight']:g}" if action == "weight" else ""
    print(f"{pool}/{server}: {state['admin']}, {state['state']}, {state['inflight']} in flight{weight}{on}")
    return 0


class ApiError(Exception):
    pass


def cluster_table(state: dict[str, Any]) -> str:
    """The fleet as `lbproxy ctl cluster` prints it: one line per node."""
    connected = "connected to etcd" if state["connected"] else f"NOT connected to etcd: {state.get('error')}"
    lines = [f"node {state['node']}: {connected}", f"{'NODE':<20} {'VERSION':<10} {'CONFIG':<26} LISTENERS"]
    for node in state["nodes"]:
        name = node.get("node", "?") + (" (this)" if node.get("self") else "")
        config = str(node.get("config_hash", "?")) + (" DIFFERS" if node.get("config_differs") else "")
        lines.append(f"{name:<20} {node.get('version', '?'):<10} {config:<26} {', '.join(node.get('listeners', []))}")
    return "\n".join(lines)


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _call(base: str, method: str, path: str, token: str | None, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {ADMIN_HEADER: "1", **({"Content-Type": "application/json"} if data is not None else {})}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            body = json.load(error)
            message = body.get("error", error.reason)
            for problem in body.get("problems", []):
                message += f"\n  {problem}"
        except (ValueError, AttributeError):
            message = error.reason
        raise ApiError(f"{method} {path}: {error.code} {message}") from None


RATE_WINDOW = 1.0


def _errors(counters: dict[str, Any]) -> int:
    return int(counters["responses"]["5xx"] + counters["connect_failures"] + counters["failures"])


def status_table(pools: list[dict[str, Any]], before: list[dict[str, Any]] | None = None, seconds: float = 1.0) -> str:
    """The servers of `pools`; with an earlier reading `before`, requests and errors per second.

    Shows what the status page shows, in the same formats: rates with one decimal, SINCE the server's
    latest change of health or admin state (the API's `last_change`) as `ago()` says it.
    """
    earlier = {
        (pool["name"], server["name"]): server["counters"] for pool in before or [] for server in pool["servers"]
    }
    rows = [
        ("POOL", "SERVER", "STATE", "ADMIN", "INFLIGHT", "REQ/S", "ERR/S", "REQUESTS", "ERRORS", "SINCE", "LAST CHECK")
    ]
    now = time.time()
    for pool in pools:
        for server in pool["servers"]:
            counters = server["counters"]
            errors = _errors(counters)
            previous = earlier.get((pool["name"], server["name"]), counters)
            rate = (counters["requests"] - previous["requests"]) / seconds
            error_rate = (errors - _errors(previous)) / seconds
            changed = _changed(server)
            since = ago(now - changed) if changed else "-"
            check = server["last_check"]
            last = "-" if check["ok"] is None else f"{'ok' if check['ok'] else 'FAIL'} {check['reason']}"
            state = server["state"] + (" (backup)" if server["backup"] else "")
            rows.append(
                (
                    pool["name"],
                    server["name"],
                    state,
                    server["admin"],
                    str(server["inflight"]),
                    f"{rate:.1f}",
                    f"{error_rate:.1f}",
                    str(counters["requests"]),
                    str(errors),
                    since,
                    last,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _changed(server: dict[str, Any]) -> float | None:
    """The time of the server's latest change of state; computed here too for an lbproxy older than
    the API's `last_change`."""
    if "last_change" in server:
        changed: float | None = server["last_change"]["time"]
        return changed
    return max(server["since"] or 0, server.get("admin_since") or 0) or None


def ago(seconds: float) -> str:
    """`42s ago`, `3m 05s ago`, `2h 07m ago`, `3d 4h ago`: as the status page's `duration()`."""
    s = max(0, int(seconds))
    if s < 60:
        text = f"{s}s"
    elif s < 3600:
        text = f"{s // 60}m {s % 60:02d}s"
    elif s < 86400:
        text = f"{s // 3600}h {s % 3600 // 60:02d}m"
    else:
        text = f"{s // 86400}d {s % 86400 // 3600}h"
    return f"{text} ago"
