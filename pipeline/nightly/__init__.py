"""Nightly regression training: run the seeded suite, check it against a calibrated baseline, keep a history.

- :mod:`pipeline.nightly.suite`: the suite index (runs, floors, runtime) and running one entry (+ probes);
- :mod:`pipeline.nightly.checks`: exact checks, bands from the calibration spread, limits and floors;
- :mod:`pipeline.nightly.baseline`: the baseline file (only ``--calibrate N`` writes it) and its provenance;
- :mod:`pipeline.nightly.history`: ``history.jsonl`` in the output folder and the trend PNG;
- :mod:`pipeline.nightly.report`: ``nightly-report.md``/``.json`` and the console lines.

Exit codes (``compactfl nightly``): 0 pass, 1 regression or failure (a crashed run, a metric out of its
band or below its floor, a missing baseline file or entry, a baseline entry without a suite run), 2 a
usage or config error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.logging_utils import get_logger
from pipeline.nightly.baseline import NightlyFailure, git_commit, load_baseline, summarize, write_baseline
from pipeline.nightly.checks import DEFAULT_CHECKS, Check, check_metric, compare
from pipeline.nightly.history import append_history, key_metrics, plot_trend, read_history
from pipeline.nightly.report import calibration_table, print_summary, write_reports
from pipeline.nightly.suite import SuiteEntry, load_suite, run_entry

__all__ = ["DEFAULT_CHECKS", "Check", "NightlyFailure", "check_metric", "compare", "load_suite", "run_nightly"]
log = get_logger("nightly")


def _select(entries: list[SuiteEntry], only: list[str] | None, suite: Path) -> list[SuiteEntry]:
    if not only:
        return entries
    unknown = sorted(set(only) - {e.name for e in entries})
    if unknown:
        raise ConfigError(f"nightly: --only {', '.join(unknown)}: not in suite {suite}")
    return [e for e in entries if e.name in only]


def _calibrate(entries: list[SuiteEntry], output: Path, overrides: list[str], seeds: int,
               ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run every entry with ``seeds`` seeds (the config's seed, +1, ...): (first-seed results, baseline entries)."""
    results, calibrated = {}, {}
    for i, entry in enumerate(entries, 1):
        base_seed = entry.config(overrides).seed
        per_seed = []
        for s in range(seeds):
            log.info("calibrate [%d/%d] %s seed %d", i, len(entries), entry.name, base_seed + s)
            res = run_entry(entry, output, overrides, seed=base_seed + s)
            per_seed.append(res)
            if "error" in res:
                break
        results[entry.name] = per_seed[0] if "error" not in per_seed[-1] else per_seed[-1]
        if "error" not in per_seed[-1]:
            calibrated[entry.name] = summarize(per_seed, DEFAULT_CHECKS)
    return results, calibrated


def run_nightly(suite: Path, baseline: Path, output: Path, overrides: list[str] | None = None,
                only: list[str] | None = None, calibrate: int = 0) -> bool:
    """Run the suite (``calibrate`` > 0: with that many seeds each, and record the baseline), check it,
    write reports and the history; True when nothing failed.

    Raises :class:`NightlyFailure` (exit 1) before any training when the baseline file is missing, and
    ConfigError (exit 2) on a bad suite, config or override.
    """
    overrides, suite, output = list(overrides or []), Path(suite), Path(output)
    if calibrate < 0:
        raise ConfigError(f"nightly: --calibrate needs a number of seeds >= 1, got {calibrate}")
    all_entries = load_suite(suite)
    entries = _select(all_entries, only, suite)
    for e in entries:  # validate everything before spending time on training
        e.config(overrides)
    previous = load_baseline(baseline) if not calibrate or Path(baseline).is_file() else None
    suite_runs = [e.name for e in all_entries]
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter()
    if calibrate:
        results, calibrated = _calibrate(entries, output, overrides, calibrate)
        crashed = sorted(set(results) - set(calibrated))
        floors = {e.name: (e.spec.min, e.spec.max) for e in entries}
        below = [c for c in compare(results, {"runs": calibrated}, floors, suite_runs)
                 if c.failed and c.kind == "floor"]
        if crashed or below:
            reasons = [f"{n} crashed" for n in crashed] + [c.one_line() for c in below]
            print("nightly: no baseline written: " + "; ".join(reasons))
            base: dict[str, Any] = {"runs": calibrated}
        else:
            base = write_baseline(baseline, calibrated, previous, suite_runs, calibrate, str(suite), overrides)
            log.info("baseline written to %s", baseline)
            print(calibration_table(base, ("test_accuracy", "test_loss", "final_train_loss", "wall_seconds")))
    else:
        base = previous or {}
        results = {}
        for i, entry in enumerate(entries, 1):
            log.info("nightly [%d/%d] %s", i, len(entries), entry.name)
            results[entry.name] = run_entry(entry, output, overrides)
    floors = {e.name: (e.spec.min, e.spec.max) for e in entries}
    checks: list[Check] = compare(results, base, floors, suite_runs)
    passed = not any(c.failed for c in checks)
    commit = git_commit()
    append_history(output, {"started": started, "commit": commit, "passed": passed, "calibrate": calibrate,
                            "overrides": overrides, "suite_seconds": time.perf_counter() - t0,
                            "runs": key_metrics(results)})
    trend = plot_trend(read_history(output), output / "nightly-trend.png")
    meta = {"started": started, "suite": str(suite), "baseline": str(baseline), "overrides": overrides,
            "commit": commit, "calibrate": calibrate, "suite_seconds": time.perf_counter() - t0}
    md = write_reports(output, checks, results, meta, trend)
    print_summary(checks, md)
    return passed
