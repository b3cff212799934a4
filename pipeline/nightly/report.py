"""The nightly's outputs: ``nightly-report.md`` (failures first, all checks, trend PNG), ``nightly-report.json``
and the console lines."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.nightly.checks import Check


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v).replace("|", "/")


def write_reports(output: Path, checks: list[Check], results: dict[str, Any], meta: dict[str, Any],
                  trend: Path | None) -> Path:
    """Write ``nightly-report.md`` and ``nightly-report.json`` into ``output``; returns the markdown path."""
    output.mkdir(parents=True, exist_ok=True)
    failed = [c for c in checks if c.failed]
    (output / "nightly-report.json").write_text(json.dumps(
        {**meta, "passed": not failed, "failures": [c.one_line() for c in failed],
         "checks": [asdict(c) for c in checks], "results": results}, indent=2, default=str))
    lines = [f"# Nightly regression report ({meta['started']})", "",
             f"**{'PASS' if not failed else 'FAIL'}**: {len(failed)} of {len(checks)} checks failed; "
             f"suite `{meta['suite']}`, baseline `{meta['baseline']}`, commit `{meta['commit']}`, "
             f"overrides {meta['overrides'] or 'none'}.", ""]
    if failed:
        lines += ["## Failures", ""] + [f"- {c.one_line()}" for c in failed] + [""]
    if trend is not None:
        lines += ["## Trend", "", f"![trend of the key metrics over the recorded nightlies]({trend.name})", ""]
    lines += ["## Checks", "", "| run | metric | check | baseline | measured | band | status |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.run} | {c.metric} | {c.kind} | {_cell(c.baseline)} | {_cell(c.measured)} | {c.band} | "
              f"{c.status} |" for c in checks]
    md = output / "nightly-report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def print_summary(checks: list[Check], report: Path) -> None:
    """One console line per failure, then the verdict."""
    failed = [c for c in checks if c.failed]
    for c in failed:
        print(f"FAIL {c.one_line()}")
    runs = sorted({c.run for c in checks})
    print(f"nightly: {'FAIL' if failed else 'PASS'} ({len(failed)} failed of {len(checks)} checks in "
          f"{len(runs)} runs); report: {report}")


def calibration_table(baseline: dict[str, Any], metrics: tuple[str, ...]) -> str:
    """Markdown table of a baseline's mean ± std per run (for BENCHMARKS.md and the calibrate console)."""
    head = "| run | seeds | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for run, entry in baseline.get("runs", {}).items():
        cells = []
        for m in metrics:
            s = entry.get("stats", {}).get(m)
            cells.append(f"{s['mean']:.4g} ± {s['std']:.2g}" if s else "-")
        lines.append(f"| {run} | {len(entry.get('seeds', []))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
