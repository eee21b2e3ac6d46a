"""Issue #19's targets over several `make bench` runs: each run's figure, and their median.

    python benchmarks/runs.py benchmarks/results/2026-12-02-5.json benchmarks/results/2026-12-02-6.json ...

One run's figure is what its report's "Targets (issue #19)" table gives: the median over its
interleaved rounds of each round's ratio to HAProxy in the same mode. The issue is judged on the
median of three runs' figures, since one run's keep-alive ratio moves by about ±0.05 (README.md).
Prints a markdown table; the README's Performance section and the closing notes quote it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from report import PURE, REFERENCE, SPEED_GOALS, Results, round_ratios


def run_figure(results: Results, scenario: str, ours: str, field: str) -> float | None:
    """One run's figure: the median over its rounds of each round's ratio to HAProxy."""
    ratios = round_ratios(
        results, scenario, ours, REFERENCE["tcp" if ours.startswith("lbproxy-tcp") else "http"], field
    )
    return statistics.median(ratios) if ratios else None


def _cell(values: list[float | None]) -> str:
    return " / ".join("-" if value is None else f"{value:.2f}" for value in values)


def table(runs: list[tuple[str, Results]]) -> list[str]:
    lines = [
        "| scenario | target | compiled, run by run | compiled, median | pure Python, median | met |",
        "|---|---|---|---|---|---|",
    ]
    for goal in SPEED_GOALS:
        compiled = [run_figure(results, goal.scenario, goal.ours, goal.field) for _, results in runs]
        pure = [run_figure(results, goal.scenario, PURE[goal.ours], goal.field) for _, results in runs]
        measured = [value for value in compiled if value is not None]
        median = statistics.median(measured) if measured else None
        pure_measured = [value for value in pure if value is not None]
        pure_median = statistics.median(pure_measured) if pure_measured else None
        met = "-"
        if median is not None:
            met = "yes" if (median <= goal.goal if goal.at_most else median >= goal.goal) else "**no**"
        target = f"{'≤' if goal.at_most else '≥'} {goal.goal:g}x" + (" (stays)" if goal.stays else "")
        cells = [f"{goal.what} (`{goal.scenario}`)", target, _cell(compiled)]
        cells += ["-" if median is None else f"{median:.3f}x", "-" if pure_median is None else f"{pure_median:.2f}x"]
        rows = [*cells, met]
        lines.append("| " + " | ".join(rows) + " |")
    return lines


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    runs = [(path, json.loads(Path(path).read_text())) for path in sys.argv[1:]]
    names = ", ".join(Path(path).stem for path, _ in runs)
    print(f"Issue #19's targets over {len(runs)} `make bench` runs ({names}):\n")
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
