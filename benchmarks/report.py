"""The results of `make bench` as people read them: markdown tables, a PNG chart and the README section.

Every figure is shown beside its ratio to the direct run (the ceiling) and to HAProxy in the same
mode (`mode http` for the L7 proxies, `mode tcp` for the L4 ones): absolute numbers on a shared
machine mean little, ratios measured in the same interleaved rounds do. Reads only the results dict
that benchmarks/run.py (or `macro.py --json FILE`) writes as JSON, so a saved result
can be re-rendered:

    python benchmarks/report.py benchmarks/results/DATE.json

The first table, "Targets (issue #19)", gives each target of issue #19 for lbproxy's compiled build
(the plain lbproxy targets) and its pure-Python build (lbproxy-http-pure and lbproxy-tcp-pure, run
with LBPROXY_PURE=1) measured in the same rounds: each the median over the rounds of that round's
ratio to HAProxy in the same mode, and the compiled figure over the pure one. Issue #6's goals follow,
for both builds. The README's performance section starts with the same two tables.

A run with `macro.py --base DIR` also gets the table "this checkout vs base": each lbproxy target's
ratios to HAProxy beside those of its twin running the base checkout (the targets whose key ends in
@base).

The table "Routing and persistence (issue #15)" sets lbproxy L7 with 10 host routes and with cookie
persistence (macro.py's variants, keep-alive with 50 connections only) beside the plain lbproxy L7
target: CPU per request as the median over the rounds of each round's ratio to the plain one.

The table "TLS (issue #16)" sets lbproxy L7 with TLS beside HAProxy `mode http` with the same
certificate in macro.py's TLS scenarios (keep-alive, resumed handshakes, full handshakes): requests/s
and CPU per request, each ratio the median over the rounds of that round's ratio, and the goals of
the issue. The TLS targets stay out of the README's matrix and the chart, which hold the plain ones.

The overload table (issue #17) is benchmarks/overload.py's own, as it measured it: four back-ends of 8
worker slots at twice their capacity, through lbproxy and HAProxy with and without a per-server limit
and queue. It goes into the run's markdown and the README's performance section as it comes, with
its setting and its goal line.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

Results = dict[str, Any]

REFERENCE = {
    "direct": "haproxy-http",
    "http": "haproxy-http",
    "tcp": "haproxy-tcp",
    "https": "haproxy-https",
    "https-notickets": "haproxy-https-notickets",
}
BASE = "@base"  # the suffix of the targets that run the base checkout's lbproxy (macro.py --base)
# Issue #19: lbproxy's compiled build (the plain targets) and its pure-Python build (LBPROXY_PURE=1, a
# process of its own), measured in the same rounds: the pure twin of each compiled target.
PURE = {"lbproxy-http": "lbproxy-http-pure", "lbproxy-tcp": "lbproxy-tcp-pure"}
# Counter updates on the L7 path per request (listener and server requests/responses, in-flight up
# and down, bytes each way, response bytes, the duration histogram and its sum): for the cost estimate.
COUNTER_UPDATES_PER_REQUEST = 11
SCRAPE_INTERVAL = 15.0  # Prometheus' default scrape interval, seconds


class Variant(NamedTuple):
    """An lbproxy target that measures a feature's cost beside a plain one (macro.py runs it)."""

    name: str
    plain: str  # the key of the target it is compared with, round by round
    scenario: str  # the one scenario it runs in


# Issue #15: each within 5% of the plain keep-alive row's CPU per request.
VARIANTS = {
    "lbproxy-http-routes": Variant("lbproxy L7, 10 host routes", "lbproxy-http", "keepalive-c50"),
    "lbproxy-http-cookie": Variant("lbproxy L7, cookie persistence", "lbproxy-http", "keepalive-c50"),
}
VARIANT_CPU_GOAL = 1.05


class SpeedGoal(NamedTuple):
    """One target of issue #19: a ratio of lbproxy to HAProxy in the same mode, in one scenario."""

    what: str
    scenario: str
    field: str  # a figure of the scenario's runs, or "added_us": the latency added (see added_latency_us)
    ours: str  # the compiled target; its pure twin is PURE[ours]
    before: str  # the ratio the issue started from (its "today", pure Python)
    goal: float
    at_most: bool = False  # a cost: the ratio must be at most `goal`; else at least
    stays: bool = False  # a ratio already met, to keep: `goal` is `before` less the run-to-run noise (5%)


# Issue #19's targets table, in its order. "stays": at least 95% of the ratio before, since one
# keep-alive ratio moves by about ±0.05 from run to run (benchmarks/README.md).
SPEED_GOALS = (
    SpeedGoal("L7 keep-alive, 50 connections, requests/s", "keepalive-c50", "rps", "lbproxy-http", "0.54x", 0.8),
    SpeedGoal("CPU per keep-alive request", "keepalive-c50", "cpu_us", "lbproxy-http", "1.9x", 1.25, at_most=True),
    SpeedGoal(
        "latency added, everything on one core (p50 less the direct run's)",
        "one-core",
        "added_us",
        "lbproxy-http",
        "1.7x",
        1.3,
        at_most=True,
    ),
    SpeedGoal("new connection per request, requests/s", "close", "rps", "lbproxy-http", "0.51x", 0.8),
    SpeedGoal("64 KiB responses, MiB/s", "64k", "transfer_mib_s", "lbproxy-http", "0.87x", 1.0),
    SpeedGoal("1 MiB responses, MiB/s", "1m", "transfer_mib_s", "lbproxy-http", "1.36x", 1.3),
    SpeedGoal(
        "L4 small requests, keep-alive, requests/s", "keepalive-c50", "rps", "lbproxy-tcp", "0.98x", 0.93, stays=True
    ),
    SpeedGoal(
        "L4 bulk, 1 GiB through one connection, GiB/s", "bulk", "gib_s", "lbproxy-tcp", "1.50x", 1.43, stays=True
    ),
)


class TlsRow(NamedTuple):
    """One scenario of the TLS table: lbproxy against HAProxy, each with the same certificate."""

    scenario: str  # a TLS scenario of macro.py
    what: str
    ours: str  # the lbproxy target
    theirs: str  # the HAProxy target
    goal: float  # requests/s at least this times HAProxy's (issue #16)


TLS_ROWS = (
    TlsRow("tls-keepalive", "keep-alive requests over TLS", "lbproxy-https", "haproxy-https", 0.5),
    TlsRow("tls-resumed", "new TLS connections/s, resumed handshakes", "lbproxy-https", "haproxy-https", 0.8),
    TlsRow(
        "tls-full",
        "new TLS connections/s, full handshakes (no tickets)",
        "lbproxy-https-notickets",
        "haproxy-https-notickets",
        0.8,
    ),
)


# -- reading the results --


def _medians(results: Results, scenario: str) -> dict[str, dict[str, float]]:
    return results["macro"]["medians"].get(scenario, {})


def _targets(results: Results) -> list[dict[str, str]]:
    return list(results["macro"]["targets"])


def _mode(results: Results, key: str) -> str:
    return next(t["mode"] for t in _targets(results) if t["key"] == key)


def _ratio(value: float, reference: float | None) -> str:
    if not reference or not value:
        return "-"
    return f"{value / reference:.2f}"


def _micro(results: Results, name: str) -> float | None:
    """The median seconds of a micro-benchmark whose name contains `name`, or None."""
    for bench in results.get("micro", {}).get("benchmarks", []):
        if name in bench["name"]:
            return float(bench["median_s"])
    return None


def added_latency_us(results: Results, key: str) -> float | None:
    """p50 latency on one core, less the direct run's: what the proxy adds to each request."""
    one_core = _medians(results, "one-core")
    if key not in one_core or "direct" not in one_core:
        return None
    return (one_core[key]["p50_ms"] - one_core["direct"]["p50_ms"]) * 1000


def round_figures(results: Results, scenario: str, key: str, field: str) -> list[float]:
    """`field` of `key` in `scenario`, round by round (the runs of one scenario are in round order);
    "added_us": the round's p50 less the direct run's in the same round, in µs. Empty: not measured."""
    runs = results["macro"]["runs"].get(scenario, {})
    if key not in runs:
        return []
    if field == "added_us":
        direct = runs.get("direct")
        if not direct:
            return []
        return [(mine["p50_ms"] - theirs["p50_ms"]) * 1000 for mine, theirs in zip(runs[key], direct, strict=True)]
    return [float(run.get(field) or 0.0) for run in runs[key]]


def round_ratios(results: Results, scenario: str, ours: str, theirs: str, field: str) -> list[float]:
    """Round by round, `field` of `ours` over that of `theirs` in the same round (rounds where the
    reference is not positive left out)."""
    mine, reference = (round_figures(results, scenario, key, field) for key in (ours, theirs))
    if not mine or not reference:
        return []
    return [value / other for value, other in zip(mine, reference, strict=True) if other > 0]


# -- the targets of issue #19 --


def speed_rows(results: Results) -> list[list[str]]:
    """The cells of issue #19's targets table (SPEED_GOALS): compiled and pure against HAProxy, each the
    median over the rounds of that round's ratio (lowest and highest in brackets), and compiled / pure."""
    rows = []
    for goal in SPEED_GOALS:
        reference = REFERENCE[_mode_of(goal.ours)]
        pure = PURE[goal.ours]
        compiled = round_ratios(results, goal.scenario, goal.ours, reference, goal.field)
        interpreted = round_ratios(results, goal.scenario, pure, reference, goal.field)
        gain = round_ratios(results, goal.scenario, goal.ours, pure, goal.field)
        ceiling = [] if goal.field in COSTS else round_ratios(results, goal.scenario, "direct", reference, goal.field)
        target = f"{'≤' if goal.at_most else '≥'} {goal.goal:g}x"
        if goal.stays:
            target = f"stays ({target})"
        met = "-"
        if compiled:
            value = statistics.median(compiled)
            met = "yes" if (value <= goal.goal if goal.at_most else value >= goal.goal) else "**no**"
        cells = [f"{goal.what} (`{goal.scenario}`)", goal.before, target]
        cells += [_spread(compiled) if compiled else "not measured", _spread(interpreted) if interpreted else "-"]
        cells += [_spread(gain) if gain else "-", _spread(ceiling), met]
        rows.append(cells)
    return rows


COSTS = ("cpu_us", "added_us")  # the figures of SPEED_GOALS where lower is better and direct has none


def _mode_of(key: str) -> str:
    return "tcp" if key.startswith("lbproxy-tcp") else "http"


def speed_text(results: Results) -> str:
    return (
        "Issue #19's targets: lbproxy's compiled build (mypyc) and its pure-Python build (`LBPROXY_PURE=1`, "
        "a process of its own with the same listeners) against HAProxy in the same mode, measured in the "
        f"same interleaved rounds. Each cell is the median over the {results['macro']['rounds']} rounds of "
        "that round's ratio (lowest and highest in brackets): requests/s, MiB/s or GiB/s, higher is better; "
        "CPU per request and latency added, lower is better. compiled / pure: the same figure of the compiled "
        'build over the pure one\'s. before #19: the ratio the issue started from (its "today", pure Python). '
        "stays: at least 95% of that ratio, one run's noise. ceiling: the direct run (one back-end, no proxy) "
        "against HAProxy, as far as a throughput ratio can go when the load side is the limit. met: the "
        "compiled build's median."
    )


def speed_table(results: Results) -> list[str]:
    lines = [
        "| scenario | before #19 | target | compiled xHAProxy | pure Python xHAProxy | compiled / pure | "
        "ceiling: direct xHAProxy | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in speed_rows(results)]
    return lines


def builds_text(results: Results, paths: bool = True) -> str:
    """Which build each lbproxy process ran, as macro.py checked it; "" for results from before #19.
    `paths`: with the folders it ran from (the README leaves them out)."""
    lbproxy = results["macro"].get("lbproxy")
    if not lbproxy:
        return ""
    builds = lbproxy["builds"]
    checkout = lbproxy["checkout"]
    compiled = sorted(name for name, build in builds.items() if build["build"] == "mypyc")
    pure = sorted(name for name, build in builds.items() if build["build"] == "pure")
    folders = sorted({str(build["package"]) for build in builds.values() if build["package"]})
    where = f"of {checkout['path']} " if paths else ""
    text = (
        f"Builds: lbproxy {where}({checkout['revision']}), run by the venv's Python with `PYTHONPATH` set to "
        "the checkout and `-P`. Each lbproxy process's build is read from the files it mapped "
        "(/proc/PID/maps) once it listens, and the run stops if a compiled target runs pure (a stale build) "
        "or the pure one compiled. Processes that ran "
    )
    parts = []
    if compiled:
        source = f", from {', '.join(folders)}" if paths else ""
        parts.append(f"compiled (mypyc{source}): {', '.join(compiled)}")
    if pure:
        parts.append(f"pure Python: {', '.join(pure)}")
    return text + "; ".join(parts) + "."


# -- the goals of issue #6 --


def goals(
    results: Results, http: str = "lbproxy-http", tcp: str = "lbproxy-tcp", micro: bool = True
) -> list[tuple[str, str, str, bool | None]]:
    """(goal, target, measured, met) for each goal the issue sets, for the lbproxy targets `http` and
    `tcp`; met is None when it was not measured. `micro`: with the goals measured by the
    micro-benchmarks (they run one build, the compiled one)."""
    rows: list[tuple[str, str, str, bool | None]] = []

    def ratio_goal(goal: str, scenario: str, field: str, ours: str, theirs: str, at_least: float) -> None:
        medians = _medians(results, scenario)
        if ours in medians and theirs in medians and medians[theirs].get(field):
            value = medians[ours][field] / medians[theirs][field]
            rows.append((goal, f"≥ {at_least:g}x", f"{value:.2f}x", value >= at_least))
        else:
            rows.append((goal, f"≥ {at_least:g}x", "not measured", None))

    ratio_goal("L7 keep-alive requests/s vs HAProxy http", "keepalive-c50", "rps", http, "haproxy-http", 0.5)
    c50 = _medians(results, "keepalive-c50")
    if http in c50 and "haproxy-http" in c50 and c50[http]["cpu_us"]:
        capacity = c50["haproxy-http"]["cpu_us"] / c50[http]["cpu_us"]
        rows.append(
            (
                "L7 keep-alive requests per CPU-second (1 / CPU per request) vs HAProxy",
                "≥ 0.5x",
                f"{capacity:.2f}x",
                capacity >= 0.5,
            )
        )
    if http in c50 and "aiohttp" in c50 and c50[http]["cpu_us"]:
        floor = c50["aiohttp"]["cpu_us"] / c50[http]["cpu_us"]
        rows.append(("L7 keep-alive requests per CPU-second vs the aiohttp floor", "≥ 6x", f"{floor:.1f}x", floor >= 6))
    ours, theirs = added_latency_us(results, http), added_latency_us(results, "haproxy-http")
    if ours is not None and theirs is not None and theirs > 0:
        rows.append(
            (
                "latency added per request, all on one core, vs HAProxy http",
                "≤ 2x",
                f"{ours / theirs:.2f}x ({ours:.0f} µs vs {theirs:.0f} µs)",
                ours / theirs <= 2,
            )
        )
    ratio_goal("1 MiB responses, throughput vs HAProxy http", "1m", "transfer_mib_s", http, "haproxy-http", 1.0)
    ratio_goal("L4 small requests (keep-alive) vs HAProxy tcp", "keepalive-c50", "rps", tcp, "haproxy-tcp", 0.5)
    ratio_goal("L4 bulk, 1 GiB through one connection, vs HAProxy tcp", "bulk", "gib_s", tcp, "haproxy-tcp", 0.9)
    if not micro:
        return rows
    bump = _micro(results, "test_server_counter_bump")
    cpu = c50.get(http, {}).get("cpu_us")
    if bump is not None and cpu:
        per_request = bump / 1000 * COUNTER_UPDATES_PER_REQUEST * 1e6
        share = per_request / cpu
        # The micro-benchmark increments from interpreted code: on the compiled Server class each one goes
        # through an attribute descriptor, where the compiled hot path adds to the field in C.
        bound = "; an upper bound: timed from interpreted code" if results["micro"].get("build") == "mypyc" else ""
        rows.append(
            (
                f"metrics cost per request ({COUNTER_UPDATES_PER_REQUEST} int increments / CPU per request)",
                "< 3%",
                f"{share:.2%} ({per_request * 1000:.0f} ns of {cpu:.0f} µs{bound})",
                share < 0.03,
            )
        )
    scrape = _micro(results, "test_scrape_400_servers")
    if scrape is not None:
        share = scrape / SCRAPE_INTERVAL
        rows.append(
            (
                f"a scrape of 400 servers every {SCRAPE_INTERVAL:g} s, share of one core",
                "< 3%",
                f"{share:.2%} ({scrape * 1000:.0f} ms per scrape)",
                share < 0.03,
            )
        )
    return rows


# -- markdown --


def markdown(results: Results, heading: str = "#") -> str:
    """Every table of a run: the goals, each scenario, the micro-benchmarks and the failover run."""
    lines = [f"{heading} lbproxy benchmarks, {results['date']}", "", setup_text(results), ""]
    if "checkouts" in results["macro"]:
        lines += [f"{heading}# This checkout vs base", "", comparison_text(results), ""]
        lines += [*comparison_table(results), ""]
    lines += [f"{heading}# Targets (issue #19): compiled and pure Python", "", speed_text(results), ""]
    lines += [*speed_table(results), ""]
    lines += [f"{heading}# Earlier goals (issue #6)", "", EARLIER_GOALS, "", *goals_table(results), ""]
    variants = variants_table(results)
    if variants:
        lines += [f"{heading}# Routing and persistence (issue #15)", "", variants_text(results), "", *variants, ""]
    tls = tls_table(results)
    if tls:
        lines += [f"{heading}# TLS (issue #16)", "", tls_text(results), "", *tls, ""]
    for scenario in results["macro"]["scenarios"]:
        if scenario["key"] not in results["macro"]["medians"]:
            continue
        lines += [f"{heading}# {scenario['title']}", "", *scenario_table(results, scenario["key"]), ""]
    if results.get("micro", {}).get("benchmarks"):
        build = {"mypyc": ", the compiled build", "pure": ", pure Python"}.get(results["micro"].get("build"), "")
        lines += [f"{heading}# Micro-benchmarks (pytest-benchmark, medians{build})", "", *micro_table(results), ""]
    failover = results.get("failover")
    if failover:
        lines += [f"{heading}# Failover (benchmarks/failover.py)", ""]
        lines += [failover.get("table") or f"exit status {failover['returncode']}; see the JSON for its output", ""]
    overload = results.get("overload")
    if overload:
        lines += [f"{heading}# Overload (benchmarks/overload.py, issue #17)", ""]
        if overload.get("table"):
            lines += [_wrap(overload.get("setting", "")), "", overload["table"], ""]
            lines += [_wrap(overload["goal"]), ""] if overload.get("goal") else []
            lines += [overload.get("details", ""), ""]
        else:
            lines += [f"exit status {overload['returncode']}; see the JSON for its output", ""]
    return "\n".join(lines).rstrip() + "\n"


def setup_text(results: Results, command: bool = True) -> str:
    machine = results["machine"]
    macro = results["macro"]
    pinning = macro["pinning"]
    versions = ", ".join(macro.get("versions", {}).values())
    if pinning["load_core"] is not None:
        where = (
            f"wrk and the four nginx back-ends pinned to core {pinning['load_core']}, each proxy alone on "
            f"core {pinning['proxy_core']} (`taskset`)"
        )
    else:
        where = "one core: nothing pinned"
    return (
        f"Machine: {machine['nproc']} cores, {machine['cpu']}, Linux {machine['kernel']}, Python {machine['python']}"
        f" (load average {machine['load_before']} when the run began: the machine is shared). "
        f"Tools: {versions}. " + (f"Command: `{results['command']}`. " if command else "") + f"{where}; "
        f"median of {macro['rounds']} interleaved "
        f"rounds of {macro['seconds']:g} s per wrk run (`wrk -t1 --latency`). "
        "CPU µs per request is the proxy process's own CPU time (from /proc) divided by the requests it served: "
        "the steadiest figure on a shared machine. Ratios are to the direct run (xdirect) and to HAProxy in "
        "the same mode (xHAProxy: `mode http` for L7 rows, `mode tcp` for L4 rows, `mode http` with the same "
        "certificate for TLS rows). " + builds_text(results, paths=command)
    ).rstrip()


def comparison_text(results: Results) -> str:
    checkouts = results["macro"]["checkouts"]
    this, base = checkouts["this"], checkouts["base"]
    return (
        f"this: lbproxy of {this['path']} ({this['revision']}); base (@base): lbproxy of {base['path']} "
        f"({base['revision']}); both run by the same Python and venv, interleaved with HAProxy in every round. "
        f"Each cell is the median over the {results['macro']['rounds']} rounds of that round's ratio to HAProxy "
        "in the same mode (`mode http` for L7, `mode tcp` for L4), the lowest and highest rounds in brackets. "
        "Throughput is requests/s (GiB/s for bulk), higher is better; CPU is the proxy's CPU time per request "
        "(per GiB for bulk), lower is better. change: this / base - 1."
    )


def comparison_table(results: Results) -> list[str]:
    """For each scenario and each lbproxy target with a twin @base: both ratios to HAProxy, this and base."""
    lines = [
        "| scenario | proxy | throughput xHAProxy: this | base | change | CPU xHAProxy: this | base | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs = results["macro"]["runs"]
    for scenario in results["macro"]["scenarios"]:
        by_target = runs.get(scenario["key"], {})
        bulk = scenario["key"] == "bulk"
        throughput, cost = ("gib_s", "cpu_s_per_gib") if bulk else ("rps", "cpu_us")
        for key, proxy, mode in (
            ("lbproxy-http", "L7", "http"),
            ("lbproxy-tcp", "L4", "tcp"),
            ("lbproxy-https", "L7 TLS", "https"),
            ("lbproxy-https-notickets", "L7 TLS, no tickets", "https-notickets"),
        ):
            reference = by_target.get(REFERENCE[mode])
            if key not in by_target or key + BASE not in by_target or not reference:
                continue
            cells = [f"`{scenario['key']}`", proxy]
            for field in (throughput, cost):
                ours = _round_ratios(by_target[key], reference, field)
                theirs = _round_ratios(by_target[key + BASE], reference, field)
                change = "-"
                if ours and theirs:
                    change = f"{statistics.median(ours) / statistics.median(theirs) - 1:+.1%}"
                cells += [_spread(ours), _spread(theirs), change]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _round_ratios(ours: list[dict[str, Any]], reference: list[dict[str, Any]], field: str) -> list[float]:
    """Round by round (the runs of one scenario are in round order), `field` of ours over the reference's."""
    return [
        float(mine[field]) / float(theirs[field])
        for mine, theirs in zip(ours, reference, strict=True)
        if mine.get(field) and theirs.get(field)
    ]


def _spread(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


def variants_text(results: Results) -> str:
    return (
        "lbproxy L7 with 10 host routes (the one wrk's Host matches written last, to a pool of the same four "
        "back-ends) and with cookie persistence (wrk sends one server's cookie: every request a hit, the "
        "cookie taken out), each an lbproxy process of its own, interleaved with the plain lbproxy L7 "
        f"target in the keep-alive scenario with 50 connections. x plain: the median over the "
        f"{results['macro']['rounds']} rounds of that round's ratio to the plain target (lowest and highest "
        f"in brackets). Goal: CPU per request within {VARIANT_CPU_GOAL - 1:.0%} of the plain target's."
    )


def variants_table(results: Results) -> list[str]:
    """Each variant measured (VARIANTS) beside its plain target; no lines when none was measured."""
    runs = results["macro"]["runs"]
    names = {t["key"]: t["name"] for t in _targets(results)}
    rows: list[str] = []
    plains: list[str] = []
    for key, variant in VARIANTS.items():
        by_target = runs.get(variant.scenario, {})
        if key not in by_target:
            continue
        medians = _medians(results, variant.scenario)
        plain = by_target.get(variant.plain)
        cpu = _round_ratios(by_target[key], plain, "cpu_us") if plain else []
        rps = _round_ratios(by_target[key], plain, "rps") if plain else []
        met = "-" if not cpu else ("yes" if statistics.median(cpu) <= VARIANT_CPU_GOAL else "**no**")
        if plain and variant.plain not in plains:
            plains.append(variant.plain)
            row = _medians(results, variant.scenario)[variant.plain]
            rows.append(
                f"| {names[variant.plain]} | {row['rps']:,.0f} | 1.00 | {_cpu(row['cpu_us'], '.1f')} | 1.00 | |"
            )
        row = medians[key]
        rows.append(
            f"| {names[key]} | {row['rps']:,.0f} | {_spread(rps)} | {_cpu(row['cpu_us'], '.1f')} | "
            f"{_spread(cpu)} | {met} |"
        )
    if not rows:
        return []
    return [
        f"| target | requests/s | x plain | CPU µs/request | CPU x plain | CPU ≤ {VARIANT_CPU_GOAL:g}x plain |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def tls_text(results: Results) -> str:
    return (
        "lbproxy L7 (`tls: {cert, key}`) and HAProxy `mode http` (`ssl crt`, `alpn http/1.1`, `nbthread 1`), "
        "each a process of its own over the same four back-ends, with the same self-signed RSA 2048 "
        "certificate; wrk negotiates TLS 1.3 with both. Resumed handshakes: wrk keeps each connection's "
        "session (SSL_shutdown, then SSL_clear, which keeps the SSL_SESSION) and offers it on the next "
        "connect, and both proxies issue TLS 1.3 session tickets, so every handshake but a connection's "
        "first is resumed. Full handshakes: the same proxies started with `OPENSSL_CONF` naming a file that "
        "sets `NumTickets = 0`, so that no ticket is issued and nothing is resumed. resumed: the share of "
        "each proxy's handshakes that were resumed, lbproxy's / HAProxy's, by their own counts (lbproxy's "
        "metrics, HAProxy's `show stat`: ssl_reused_sess against ssl_sess). "
        f"xHAProxy: the median over the {results['macro']['rounds']} rounds of that "
        "round's ratio to HAProxy (lowest and highest in brackets). Goals (issue #16): keep-alive over TLS "
        "≥ 0.5x HAProxy's requests/s, new TLS connections (handshakes) ≥ 0.8x HAProxy's."
    )


def tls_table(results: Results) -> list[str]:
    """Each TLS scenario measured (TLS_ROWS): lbproxy beside HAProxy; no lines when none was measured."""
    runs = results["macro"]["runs"]
    rows: list[str] = []
    for row in TLS_ROWS:
        by_target = runs.get(row.scenario, {})
        if row.ours not in by_target and row.theirs not in by_target:
            continue
        medians = _medians(results, row.scenario)
        ours, theirs = medians.get(row.ours, {}), medians.get(row.theirs, {})
        both = row.ours in by_target and row.theirs in by_target
        rps = _round_ratios(by_target[row.ours], by_target[row.theirs], "rps") if both else []
        cpu = _round_ratios(by_target[row.ours], by_target[row.theirs], "cpu_us") if both else []
        met = "-" if not rps else ("yes" if statistics.median(rps) >= row.goal else "**no**")
        cells = [
            f"{row.what} (`{row.scenario}`)",
            f"{ours['rps']:,.0f}" if ours else "-",
            f"{theirs['rps']:,.0f}" if theirs else "-",
            _spread(rps),
            _cpu(ours.get("cpu_us", 0.0), ".1f"),
            _cpu(theirs.get("cpu_us", 0.0), ".1f"),
            _spread(cpu),
            _resumed(ours, theirs) if row.scenario != "tls-keepalive" else "-",
            f"≥ {row.goal:g}x",
            met,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "| scenario | lbproxy requests/s | HAProxy requests/s | requests/s xHAProxy | lbproxy CPU µs/request | "
        "HAProxy CPU µs/request | CPU xHAProxy | resumed | goal: requests/s | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _resumed(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """The shares of handshakes resumed, lbproxy's / HAProxy's ("-" for a proxy that counts none)."""
    return " / ".join(f"{side['resumed_pct']:.0f}%" if "resumed_pct" in side else "-" for side in (ours, theirs))


EARLIER_GOALS = "For both builds, each figure as that issue reads it: the ratio of the medians."


def goals_table(results: Results) -> list[str]:
    """Issue #6's goals, for the compiled build and for the pure one (issue #19: neither may rot); the
    goals of the micro-benchmarks, which run one build, in the compiled column only."""
    pure = {goal: (measured, met) for goal, _, measured, met in goals(results, *PURE.values(), micro=False)}
    lines = [
        "| goal | target | compiled (mypyc) | met | pure Python | met |",
        "|---|---|---|---|---|---|",
    ]
    for goal, target, measured, met in goals(results):
        theirs, their_met = pure.get(goal, ("-", None))
        lines.append(f"| {goal} | {target} | {measured} | {_met(met)} | {theirs} | {_met(their_met)} |")
    return lines


def _met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def scenario_table(results: Results, scenario: str) -> list[str]:
    medians = _medians(results, scenario)
    names = {t["key"]: t["name"] for t in _targets(results)}
    if scenario == "bulk":
        lines = [
            "| target | GiB/s | xdirect | xHAProxy | CPU s per GiB | CPU xHAProxy |",
            "|---|---|---|---|---|---|",
        ]
        direct, haproxy = medians.get("direct", {}), medians.get("haproxy-tcp", {})
        for key, row in medians.items():
            lines.append(
                f"| {names[key]} | {row['gib_s']:.2f} | {_ratio(row['gib_s'], direct.get('gib_s'))} | "
                f"{_ratio(row['gib_s'], haproxy.get('gib_s'))} | {_cpu(row['cpu_s_per_gib'], '.2f')} | "
                f"{_ratio(row['cpu_s_per_gib'], haproxy.get('cpu_s_per_gib'))} |"
            )
        return lines
    throughput = scenario in ("64k", "1m")
    one_core = scenario == "one-core"
    header = "| target | requests/s | xdirect | xHAProxy |"
    rule = "|---|---|---|---|"
    if throughput:
        header += " MiB/s |"
        rule += "---|"
    header += " p50 ms | p99 ms |"
    rule += "---|---|"
    if one_core:
        header += " added µs (p50 - direct) | added xHAProxy |"
        rule += "---|---|"
    header += " CPU µs/request | CPU xHAProxy | errors |"
    rule += "---|---|---|"
    lines = [header, rule]
    direct = medians.get("direct", {})
    ordered = [t["key"] for t in _targets(results) if t["key"] in medians]
    for key in ordered:
        row = medians[key]
        reference = medians.get(REFERENCE[_mode(results, key)], {})
        cells = [
            names[key],
            f"{row['rps']:,.0f}",
            _ratio(row["rps"], direct.get("rps")),
            _ratio(row["rps"], reference.get("rps")),
        ]
        if throughput:
            cells.append(f"{row['transfer_mib_s']:,.0f}")
        cells += [f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}"]
        if one_core:
            added = added_latency_us(results, key)
            theirs = added_latency_us(results, REFERENCE[_mode(results, key)])
            if key == "direct" or added is None:
                cells += ["-", "-"]
            else:
                cells += [f"{added:.0f}", _ratio(added, theirs) if theirs and theirs > 0 else "-"]
        cells += [
            _cpu(row["cpu_us"], ".1f"),
            _ratio(row["cpu_us"], reference.get("cpu_us")) if key != "direct" else "-",
            f"{row['errors']:.0f}" if row.get("errors") else "0",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cpu(value: float, spec: str) -> str:
    return format(value, spec) if value else "-"


def micro_table(results: Results) -> list[str]:
    lines = ["| group | benchmark | median | rounds |", "|---|---|---|---|"]
    lines += [
        f"| {bench['group']} | `{bench['name']}` | {_duration(bench['median_s'])} | {bench['rounds']} |"
        for bench in results["micro"]["benchmarks"]
    ]
    return lines


def _duration(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e9:.0f} ns"


# -- the README section --


def readme_section(results: Results, files: str) -> str:
    """`## Performance`: the setting, the goals and one matrix of every target and scenario."""
    names = {t["key"]: t["name"] for t in _targets(results)}
    columns = [
        ("keepalive-c50", "keep-alive, 50 conns", "rps", "{:,.0f} req/s"),
        ("keepalive-c500", "keep-alive, 500 conns", "rps", "{:,.0f} req/s"),
        ("close", "new connection per request", "rps", "{:,.0f} req/s"),
        ("64k", "64 KiB responses", "transfer_mib_s", "{:,.0f} MiB/s"),
        ("1m", "1 MiB responses", "transfer_mib_s", "{:,.0f} MiB/s"),
        ("bulk", "L4 bulk, 1 GiB", "gib_s", "{:.2f} GiB/s"),
        ("keepalive-c50", "CPU per request (keep-alive)", "cpu_us", "{:.1f} µs"),
    ]
    header = "| target | " + " | ".join(title for _, title, _, _ in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for target in _targets(results):
        key = target["key"]
        if not _in_matrix(target):  # in the tables of their own, below
            continue
        cells = [names[key]]
        for scenario, _, field, spec in columns:
            medians = _medians(results, scenario)
            if key not in medians or not medians[key].get(field):
                cells.append("-")
                continue
            value = medians[key][field]
            reference = medians.get(REFERENCE[target["mode"]], {}).get(field)
            direct = medians.get("direct", {}).get(field)
            cell = spec.format(value)
            ratios = []
            if reference and key not in ("haproxy-http", "haproxy-tcp"):
                ratios.append(f"{value / reference:.2f}x HAProxy")
            if direct and key != "direct" and field != "cpu_us":
                ratios.append(f"{value / direct:.2f}x direct")
            if ratios:
                cell += " (" + ", ".join(ratios) + ")"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    intro = (
        f"Measured on {results['date']} with `{results['command']}`, which sets up `.venv`, installs wrk, "
        "HAProxy and nginx when they are missing, runs everything and stops all it started. "
        + setup_text(results, command=False)
    )
    after = (
        f"Every scenario with p50/p99 latency, the one-core latency run and the micro-benchmarks: {files}. "
        "`make profile` records lbproxy under py-spy during the keep-alive scenario."
    )
    return "\n".join(
        [
            "## Performance",
            "",
            _wrap(intro),
            "",
            _wrap(speed_text(results)),
            "",
            *speed_table(results),
            "",
            "Earlier goals (issue #6). " + EARLIER_GOALS,
            "",
            *goals_table(results),
            "",
            "Every target against the same four nginx back-ends (xHAProxy: `mode http` for L7 rows, `mode tcp` "
            "for L4 rows):",
            "",
            *lines,
            "",
            *variants_readme(results),
            *tls_readme(results),
            *overload_readme(results),
            _wrap(after),
            "",
        ]
    )


def variants_readme(results: Results) -> list[str]:
    """The README's lines for the routing and persistence table, when it was measured."""
    table = variants_table(results)
    if not table:
        return []
    return [_wrap("Routing and persistence (issue #15): " + variants_text(results)), "", *table, ""]


def tls_readme(results: Results) -> list[str]:
    """The README's lines for the TLS table, when it was measured."""
    table = tls_table(results)
    if not table:
        return []
    return [_wrap("TLS (issue #16): " + tls_text(results)), "", *table, ""]


def overload_readme(results: Results) -> list[str]:
    """The README's lines for the overload table (benchmarks/overload.py), when it was measured."""
    overload = results.get("overload") or {}
    if not overload.get("table"):
        return []
    intro = (
        "Overload (issue #17, `benchmarks/overload.py`): " + overload.get("setting", "") + " Each target on fresh "
        "processes, one after the other. 2xx/s: the 2xx answered within the load's window, per second; x "
        "capacity: over the farm's capacity. 5xx at clients: from the back-ends (they sign theirs) / made by "
        "the proxy (its queue full or timed out); the back-ends' 503s by their own count."
    )
    lines = [_wrap(intro), "", overload["table"], ""]
    if overload.get("goal"):
        lines += [_wrap(overload["goal"]), ""]
    return lines


def _in_matrix(target: dict[str, str]) -> bool:
    """Whether a target has a row in the README's matrix and the chart: not the variants (one scenario
    only) nor the TLS targets (their own scenarios): those have tables of their own."""
    return target["key"] not in VARIANTS and not target["mode"].startswith("https")


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def update_readme(readme: Path, section: str) -> None:
    """Replace the README's performance section (`## Performance`, or the older `## How it compares,
    measured`) up to the next `## ` heading; append it when there is none."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(r"^## (?:Performance|How it compares, measured)\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section
    readme.write_text(text.rstrip() + "\n", encoding="utf-8")


# -- the chart --

COLOURS = {
    "direct": "#b0b0b0",
    "lbproxy-http": "#1f77b4",
    "lbproxy-tcp": "#6baed6",
    "lbproxy-http-pure": "#17becf",
    "lbproxy-tcp-pure": "#9edae5",
    "haproxy-http": "#ff7f0e",
    "haproxy-tcp": "#fdae6b",
    "nginx": "#2ca02c",
    "aiohttp": "#7f7f7f",
    "lbproxy-http" + BASE: "#9467bd",
    "lbproxy-tcp" + BASE: "#c5b0d5",
}


def chart(results: Results, path: Path) -> None:
    """One panel per scenario: each target's figure as a bar, labelled with its ratio to HAProxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, str, Callable[[float], str]]] = [
        ("keepalive-c50", "Keep-alive, 50 connections\nrequests/s", "rps", lambda v: f"{v / 1000:.1f}k"),
        ("keepalive-c500", "Keep-alive, 500 connections\nrequests/s", "rps", lambda v: f"{v / 1000:.1f}k"),
        ("close", "New connection per request\nrequests/s", "rps", lambda v: f"{v / 1000:.1f}k"),
        ("64k", "64 KiB responses\nMiB/s", "transfer_mib_s", lambda v: f"{v:,.0f}"),
        ("1m", "1 MiB responses\nMiB/s", "transfer_mib_s", lambda v: f"{v:,.0f}"),
        ("bulk", "L4 bulk, one connection\nGiB/s", "gib_s", lambda v: f"{v:.2f}"),
        ("keepalive-c50", "CPU per request, keep-alive\nµs (lower is better)", "cpu_us", lambda v: f"{v:.0f}"),
        ("one-core", "Latency added on one core\nµs at p50 (lower is better)", "added_us", lambda v: f"{v:.0f}"),
    ]
    names = {t["key"]: t["name"] for t in _targets(results)}
    order = [t["key"] for t in _targets(results) if _in_matrix(t)]  # the others are in tables of their own
    rows = list(range(len(order)))[::-1]  # the first target on top, the same row in every panel
    figure, axes = plt.subplots(2, 4, figsize=(18, 8.5), sharey=True)
    for axis, (scenario, title, field, label) in zip(axes.flat, panels, strict=True):
        medians = _medians(results, scenario)
        values: dict[str, float] = {}
        for key in order:
            if key not in medians:
                continue
            if field == "added_us":
                added = added_latency_us(results, key)
                if key != "direct" and added is not None:
                    values[key] = max(added, 0.0)
            elif medians[key].get(field):
                values[key] = medians[key][field]
        shown = [key for key in order if key in values]
        y = [rows[order.index(key)] for key in shown]
        axis.barh(y, [values[k] for k in shown], color=[COLOURS.get(k, "#999") for k in shown], height=0.7)
        axis.set_yticks(rows, [names[key] for key in order])
        axis.set_title(title, fontsize=11)
        axis.tick_params(axis="y", labelsize=10)
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="x", alpha=0.3)
        axis.set_axisbelow(True)
        top = max(values.values(), default=1.0)
        axis.set_xlim(0, top * 1.6)
        for key, row in zip(shown, y, strict=True):
            reference = REFERENCE[_mode(results, key)]
            text = label(values[key])
            if key != "direct" and reference in values and key != reference and values[reference]:
                text += f"  {values[key] / values[reference]:.2f}x HAP"
            axis.text(values[key] + top * 0.02, row, text, va="center", fontsize=8.5)
    machine = results["machine"]
    figure.suptitle(
        f"lbproxy vs HAProxy, nginx and aiohttp: {results['date']}, {machine['nproc']} cores ({machine['cpu']}), "
        f"median of {results['macro']['rounds']} interleaved rounds\n"
        "xHAP: ratio to HAProxy in the same mode (mode http for the L7 rows, mode tcp for the L4 rows)",
        fontsize=12,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    source = Path(sys.argv[1])
    results = json.loads(source.read_text())
    source.with_suffix(".md").write_text(markdown(results))
    chart(results, source.with_suffix(".png"))
    print(source.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
