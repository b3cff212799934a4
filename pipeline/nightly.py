"""Nightly regression training: run a suite of short seeded configs and compare them with a baseline.

Each metric has a check kind: ``exact`` (parameter/MAC counts, payload and exchanged bytes), ``abs``
(accuracy: |measured - baseline| <= tol), ``rel`` (loss: |measured - baseline| <= tol * max(|baseline|, floor))
or ``ratio`` (wall time: measured / baseline <= tol, i.e. only a slowdown fails; skipped for runs shorter
than ``min_seconds``, where timing is noise). Tolerances live in the baseline file so they are reviewed with it.
A run that crashes (e.g. diverges) is a regression. Writes ``nightly-report.md`` + ``nightly-report.json``,
prints a pass/fail table and returns False on any regression (the CLI exits 1).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_config
from pipeline.logging_utils import get_logger

log = get_logger("nightly")

BASELINE_FORMAT = "compactfl-nightly-baseline/1"
NIGHTLY_EXPERIMENT = "compactfl-nightly"  # every suite run of every night in one MLflow experiment
DEFAULT_CHECKS: dict[str, dict[str, Any]] = {
    "params_train": {"kind": "exact"},
    "params_deploy": {"kind": "exact"},
    "macs_train": {"kind": "exact"},
    "macs_deploy": {"kind": "exact"},
    "payload_bytes_train": {"kind": "exact"},
    "payload_bytes_deploy": {"kind": "exact"},
    "bytes_total": {"kind": "exact"},
    "test_accuracy": {"kind": "abs", "tol": 0.03},
    "test_loss": {"kind": "rel", "tol": 0.10, "floor": 0.1},
    "final_train_loss": {"kind": "rel", "tol": 0.10, "floor": 0.1},
    "wall_seconds": {"kind": "ratio", "tol": 3.0, "min_seconds": 20.0},
}


@dataclass
class Check:
    run: str
    metric: str
    kind: str
    baseline: Any
    measured: Any
    band: str
    status: str  # pass | FAIL | new | skip

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


# ------------------------------------------------------------------------------------------- compare
def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def check_metric(run: str, metric: str, spec: dict[str, Any], base: Any, got: Any) -> Check:
    """Compare one metric with its baseline value according to ``spec`` (kind + tolerance)."""
    kind = spec["kind"]
    if base is None:
        return Check(run, metric, kind, None, got, "-", "new")
    b, g = _num(base), _num(got)
    if kind == "exact":
        return Check(run, metric, kind, base, got, "== baseline", "pass" if got == base else "FAIL")
    if b is None or g is None or not math.isfinite(g):
        return Check(run, metric, kind, base, got, "finite number", "FAIL")
    if kind == "abs":
        tol = float(spec["tol"])
        return Check(run, metric, kind, base, got, f"±{tol:g}", "pass" if abs(g - b) <= tol else "FAIL")
    if kind == "rel":
        tol, floor = float(spec["tol"]), float(spec.get("floor", 0.0))
        width = tol * max(abs(b), floor)
        return Check(run, metric, kind, base, got, f"±{width:.3g}", "pass" if abs(g - b) <= width else "FAIL")
    if kind == "ratio":
        tol, min_s = float(spec["tol"]), float(spec.get("min_seconds", 0.0))
        band = f"<= x{tol:g}"
        if b < min_s:
            return Check(run, metric, kind, base, got, f"{band} (runs >= {min_s:g}s)", "skip")
        ok = b > 0 and g / b <= tol  # only a slowdown is a regression; a speed-up passes
        return Check(run, metric, kind, base, got, band, "pass" if ok else "FAIL")
    raise ValueError(f"baseline: unknown check kind {kind!r} for metric {metric!r}")


def compare(results: dict[str, dict[str, Any]], baseline: dict[str, Any]) -> list[Check]:
    """Checks of every suite run against the baseline (crashed runs and lost baseline runs fail)."""
    checks_spec = {**DEFAULT_CHECKS, **baseline.get("checks", {})}
    base_runs = baseline.get("runs", {})
    out: list[Check] = []
    for run, res in results.items():
        if "error" in res:
            out.append(Check(run, "run", "completes", "ok", res["error"], "no error", "FAIL"))
            continue
        base = base_runs.get(run, {})
        for metric, spec in checks_spec.items():
            if metric in res or metric in base:
                out.append(check_metric(run, metric, spec, base.get(metric), res.get(metric)))
    return out


# ----------------------------------------------------------------------------------------------- run
def suite_configs(suite: Path) -> list[Path]:
    """The suite's YAML configs, sorted by name (a folder of configs, or one config file)."""
    suite = Path(suite)
    if suite.is_file():
        return [suite]
    files = sorted(p for p in suite.glob("*.yaml") if p.is_file()) if suite.is_dir() else []
    if not files:
        raise ConfigError(f"nightly: suite {str(suite)!r} holds no *.yaml configs")
    return files


def run_suite_entry(path: Path, output: Path, overrides: list[str]) -> dict[str, Any]:
    """Run one suite config into ``output/runs/<stem>`` (fresh); returns its summary or ``{"error": ...}``."""
    from pipeline.engines import run_engine
    from pipeline.stages import prepare_run_dir

    name = path.stem
    cfg = load_config(path, [f"output={output / 'runs'}", f"name={name}", "resume=false",
                             f"tracking.mlflow.experiment={NIGHTLY_EXPERIMENT}", *overrides])
    run_dir = Path(cfg.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    try:
        summary = run_engine(cfg, prepare_run_dir(cfg))
    except Exception as exc:  # a crashing run is a regression, reported rather than aborting the suite
        log.error("nightly: %s failed: %s", name, exc)
        log.debug("%s", traceback.format_exc())
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    return {k: summary.get(k) for k in DEFAULT_CHECKS if k in summary} | {"run_dir": str(run_dir)}


def load_baseline(path: Path) -> dict[str, Any]:
    """The baseline file (an empty baseline when it does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return {"format": BASELINE_FORMAT, "checks": {}, "runs": {}}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"nightly: baseline {path} is not valid JSON ({exc.msg})") from None
    if doc.get("format") != BASELINE_FORMAT:
        raise ConfigError(f"nightly: baseline {path} is not a {BASELINE_FORMAT} file")
    return doc


def write_baseline(path: Path, results: dict[str, dict[str, Any]], previous: dict[str, Any]) -> None:
    """Store measured metrics as the new baseline (keeps the tolerances and runs not in this suite)."""
    runs = dict(previous.get("runs", {}))
    for name, res in results.items():
        if "error" in res:
            raise ValueError(f"nightly: cannot record a baseline: run {name} failed ({res['error']})")
        runs[name] = {k: v for k, v in res.items() if k in DEFAULT_CHECKS}
    doc = {
        "format": BASELINE_FORMAT,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "checks": previous.get("checks") or DEFAULT_CHECKS,
        "runs": dict(sorted(runs.items())),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write_reports(output: Path, checks: list[Check], results: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``nightly-report.md`` and ``nightly-report.json`` into ``output``; returns the markdown path."""
    output.mkdir(parents=True, exist_ok=True)
    failed = [c for c in checks if c.failed]
    (output / "nightly-report.json").write_text(json.dumps(
        {**meta, "passed": not failed, "checks": [asdict(c) for c in checks], "results": results}, indent=2,
        default=str))
    lines = [f"# Nightly regression report ({meta['started']})", "",
             f"**{'PASS' if not failed else 'FAIL'}**: {len(failed)} of {len(checks)} checks failed; "
             f"suite `{meta['suite']}`, baseline `{meta['baseline']}`, overrides {meta['overrides'] or 'none'}.", "",
             "| run | metric | check | baseline | measured | band | status |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.run} | {c.metric} | {c.kind} | {_cell(c.baseline)} | {_cell(c.measured)} | {c.band} | "
              f"{c.status} |" for c in checks]
    md = output / "nightly-report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def print_table(checks: list[Check]) -> None:
    """The console pass/fail table (failures first, then one line per run for passing metrics)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="compactfl nightly")
    for col in ("run", "metric", "baseline", "measured", "band", "status"):
        table.add_column(col)
    for c in sorted(checks, key=lambda c: (not c.failed, c.run, c.metric)):
        style = "bold red" if c.failed else ("yellow" if c.status in ("new", "skip") else "green")
        table.add_row(c.run, c.metric, _cell(c.baseline), _cell(c.measured), c.band, f"[{style}]{c.status}[/]")
    Console(width=max(120, Console().width)).print(table)


def run_nightly(suite: Path, baseline: Path, output: Path, overrides: list[str] | None = None,
                update_baseline: bool = False, only: list[str] | None = None) -> bool:
    """Run the suite, compare with (or update) the baseline, write reports; True when nothing regressed."""
    overrides = list(overrides or [])
    configs = suite_configs(suite)
    if only:
        unknown = sorted(set(only) - {p.stem for p in configs})
        if unknown:
            raise ConfigError(f"nightly: --only {', '.join(unknown)}: not in suite {suite}")
        configs = [p for p in configs if p.stem in only]
    for p in configs:  # validate everything before spending time on training
        load_config(p, overrides)
    base = load_baseline(baseline)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    results: dict[str, dict[str, Any]] = {}
    for i, p in enumerate(configs, 1):
        log.info("nightly [%d/%d] %s", i, len(configs), p.stem)
        t0 = time.perf_counter()
        results[p.stem] = run_suite_entry(p, Path(output), overrides)
        log.info("nightly [%d/%d] %s done in %.1f s", i, len(configs), p.stem, time.perf_counter() - t0)
    if update_baseline:
        write_baseline(baseline, results, base)
        base = load_baseline(baseline)
        log.info("baseline written to %s", baseline)
    checks = compare(results, base)
    meta = {"started": started, "suite": str(suite), "baseline": str(baseline), "overrides": overrides,
            "updated_baseline": update_baseline}
    md = write_reports(Path(output), checks, results, meta)
    print_table(checks)
    failed = sum(c.failed for c in checks)
    print(f"nightly: {'FAIL' if failed else 'PASS'} ({failed} regressions in {len(checks)} checks); report: {md}")
    return failed == 0
