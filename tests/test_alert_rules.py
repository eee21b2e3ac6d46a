"""The alerting rules of config/prometheus/: checked and unit-tested by promtool, and written only
against metrics a running lbproxy really exports.

promtool comes with Debian's prometheus package (.ci/system-deps installs it). Without it the
promtool tests skip on a developer's machine and fail on CI (CI=true), where a skip would hide a
broken rule file. The metric-name test needs no promtool: it starts lbproxy on 127.0.0.1, makes it
serve its maintenance page (its only pool at tier `none`), scrapes /metrics and looks up every
selector of every rule there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Backend, get, port_of, running

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus" / "lbproxy-alerts.yml"
RULE_TESTS = ROOT / "config" / "prometheus" / "lbproxy-alerts.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
PROMTOOL_TIMEOUT = 60  # seconds; both promtool runs take well under one

# A listener with a maintenance page in front of a pool of one server, which the test disables.
CONFIG = """
admin:
  bind: 127.0.0.1:0
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
    maintenance_page: maintenance.html
pools:
  farm:
    servers:
      - {{name: a, address: "{a}"}}
"""
PAGE = b"<h1>Back soon</h1>\n"

# PromQL, as far as these rules use it: a selector is a metric name with optional {matchers}.
SELECTOR = re.compile(r"\b(lbproxy_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
COUNTER_FUNCTION = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*(lbproxy_[a-z0-9_]+)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """`promtool ARGS` from the repository's root; skips (fails on CI) when promtool is missing."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed: it comes with Debian's prometheus package (.ci/system-deps)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [path, *args], cwd=ROOT, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT, check=False
    )


def test_a_missing_promtool_skips_here_and_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="promtool is not installed"):
        promtool("--version")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="promtool is not installed"):
        promtool("--version")


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"
    assert (firing | quiet) - names == set(), "unit tests of alerts that do not exist"


def test_every_alert_is_complete() -> None:
    for rule in alerts():
        name = rule["alert"]
        assert "for" in rule, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, name


def _anchors(markdown: str) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return anchors


def test_runbook_links_point_at_sections_of_the_operations_guide() -> None:
    anchors = _anchors(OPERATIONS.read_text())
    for rule in alerts():
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/operations.md"


async def test_the_rules_use_only_metrics_lbproxy_exports(tmp_path: Path) -> None:
    (tmp_path / "maintenance.html").write_bytes(PAGE)
    async with (
        Backend("a") as a,
        running(CONFIG, tmp_path, a=a.address) as lb,
        aiohttp.ClientSession() as session,
    ):
        admin = lb.bound["admin"]
        admin_url = f"http://{admin.host}:{admin.port}"
        # Disabled, the only server leaves nothing to serve: the listener answers its maintenance page.
        url = f"{admin_url}/api/v1/pools/farm/servers/a/disable"
        async with session.post(url, headers={"X-Lbproxy-Admin": "1"}) as response:
            assert response.status == 200, await response.text()
        served = await get(port_of(lb))
        assert (served.status, served.body) == (503, PAGE)
        async with session.get(f"{admin_url}/metrics") as response:
            assert response.status == 200
            text = await response.text()

    samples: dict[str, list[dict[str, str]]] = {}  # sample name -> the label sets it comes with
    types: dict[str, str] = {}  # sample name -> its family's type
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
            types[sample.name] = family.type
            values[sample.name, frozenset(sample.labels.items())] = sample.value
    # What the maintenance alert counts is exactly the page just served. With no backup server and no
    # backup pool, the disabled server leaves farm at tier none (LbproxyPoolNoServerLeft), one-hot:
    # no failover tier (LbproxyPoolFailedOver stays quiet), and no failover counted. No reload was
    # tried: LbproxyConfigReloadFailed is quiet.
    assert values["lbproxy_listener_errors_total", frozenset({("listener", "web"), ("status", "503")})] == 1
    tiers = {
        labels["tier"]: values["lbproxy_pool_tier", frozenset(labels.items())]
        for labels in samples["lbproxy_pool_tier"]
        if labels["pool"] == "farm"
    }
    assert tiers == {"primaries": 0, "primaries+backups": 0, "backups": 0, "backup_pool": 0, "none": 1}
    assert values["lbproxy_pool_tier", frozenset({("pool", "farm"), ("tier", "none")})] == 1
    assert values["lbproxy_pool_failovers_total", frozenset({("pool", "farm")})] == 0
    assert values["lbproxy_config_last_reload_successful", frozenset()] == 1

    for rule in alerts():
        name = rule["alert"]
        expr = rule["expr"]
        used = SELECTOR.findall(expr)
        assert used or "up{" in expr, f"{name}: no lbproxy metric in {expr!r}"
        for metric, matchers in used:
            assert metric in samples, f"{name}: lbproxy exports no {metric}"
            for label, op, value in MATCHER.findall(matchers):
                assert any(label in labels for labels in samples[metric]), f"{name}: {metric} has no label {label}"
                exported = {labels[label] for labels in samples[metric] if label in labels}
                if op == "=":
                    assert value in exported, f"{name}: no {metric}{{{label}={value!r}}} in the scrape"
                elif op == "=~":
                    # A PromQL string: "\\" is one backslash. Each alternative (these rules use no
                    # groups) must match a value lbproxy exports, or it is a typo.
                    pattern = value.replace("\\\\", "\\")
                    alternatives = [pattern] if "(" in pattern else pattern.split("|")
                    for alternative in alternatives:
                        assert any(re.fullmatch(alternative, exported_value) for exported_value in exported), (
                            f"{name}: {label}=~{value!r}: {alternative!r} matches no value of {metric} in the scrape"
                        )
        for metric in COUNTER_FUNCTION.findall(expr):
            assert types[metric] == "counter", f"{name}: rate or increase of the {types[metric]} {metric}"
        known = TARGET_LABELS.union(*(labels for metric, _ in used for labels in samples[metric]))
        for grouping in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in known, f"{name}: no metric of {expr!r} has the label {label}"
        # Metric names in the text for people (annotations) are real too.
        for annotation in rule["annotations"].values():
            for metric in re.findall(r"\blbproxy_[a-z0-9_]+", annotation):
                assert metric in samples, f"{name}: its annotations name {metric}, which lbproxy does not export"
