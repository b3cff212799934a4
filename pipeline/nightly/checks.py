"""Nightly checks: each measured metric against its baseline (exact, band, ratio) or a fixed limit.

Check kinds (the specs are stored in the baseline file, so a change to them is reviewed with it):
- ``exact``: counts, bytes, the optimizer's learning rate, the first batch's checksum: equal or FAIL;
- ``band``: seeded training metrics: ``|measured - mean| <= max(k * std, min_abs, min_rel * |mean|)`` with
  mean and std over the calibration seeds;
- ``ratio``: wall time: ``measured <= tol * mean`` (only a slowdown fails; skipped below ``min_seconds``);
- ``limit``: an invariant that needs no baseline: ``measured <= max`` (e.g. the FedAvg round-1 error).
A suite run's floors (``min``/``max`` in the suite index) are checked too. A missing value, a non-finite
value, a missing baseline entry or a baseline entry without a suite run is a failure, never "new".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_CHECKS: dict[str, dict[str, Any]] = {
    "params_train": {"kind": "exact"},
    "params_deploy": {"kind": "exact"},
    "macs_train": {"kind": "exact"},
    "macs_deploy": {"kind": "exact"},
    "payload_bytes_train": {"kind": "exact"},
    "payload_bytes_deploy": {"kind": "exact"},
    "bytes_total": {"kind": "exact"},
    "train_lr": {"kind": "exact"},
    "first_batch_sha": {"kind": "exact"},
    "test_accuracy": {"kind": "band", "k": 3.0, "min_abs": 0.02},
    "test_loss": {"kind": "band", "k": 3.0, "min_rel": 0.03},
    "teacher_test_accuracy": {"kind": "band", "k": 3.0, "min_abs": 0.02},
    "final_train_loss": {"kind": "band", "k": 3.0, "min_rel": 0.03},
    "wall_seconds": {"kind": "ratio", "tol": 3.0, "min_seconds": 20.0},
    "fedavg_round1_error": {"kind": "limit", "max": 1e-4},
}
#: metrics that vary with the seed: calibrated as mean and spread (all others are recorded at the suite seed)
BANDED_KINDS = ("band", "ratio")


@dataclass
class Check:
    """One line of the nightly report."""

    run: str
    metric: str
    kind: str
    baseline: Any
    measured: Any
    band: str
    status: str  # pass | FAIL | skip
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def one_line(self) -> str:
        """``run metric: reason`` (the console and report line of a failure)."""
        return f"{self.run} {self.metric}: {self.reason or self.status}"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def band_width(spec: dict[str, Any], mean: float, std: float) -> float:
    """Half-width of a band: ``max(k * std, min_abs, min_rel * |mean|)``."""
    return max(float(spec.get("k", 3.0)) * std, float(spec.get("min_abs", 0.0)),
               float(spec.get("min_rel", 0.0)) * abs(mean))


def check_metric(run: str, metric: str, spec: dict[str, Any], base: Any, got: Any) -> Check:
    """Compare one measured metric with its baseline record (``base``: a value, or ``{mean, std}`` for bands)."""
    kind = spec["kind"]

    def fail(band: str, reason: str, baseline: Any = base) -> Check:
        return Check(run, metric, kind, baseline, got, band, "FAIL", reason)

    if got is None:
        return fail("measured", "not measured (the run no longer reports it)")
    if kind == "exact":
        if base is None:
            return fail("== baseline", "no baseline value (recalibrate: compactfl nightly --calibrate N)")
        ok = got == base
        return Check(run, metric, kind, base, got, "== baseline", "pass" if ok else "FAIL",
                     "" if ok else f"{_fmt(got)} != baseline {_fmt(base)}")
    g = _num(got)
    if g is None or not math.isfinite(g):
        return fail("finite number", f"non-finite value {got!r}")
    if kind == "limit":
        limit = float(spec["max"])
        ok = g <= limit
        return Check(run, metric, kind, None, got, f"<= {limit:g}", "pass" if ok else "FAIL",
                     "" if ok else f"{g:.4g} > {limit:g} (invariant)")
    if not isinstance(base, dict) or _num(base.get("mean")) is None:
        return fail("baseline", "no baseline mean (recalibrate: compactfl nightly --calibrate N)")
    mean, std = float(base["mean"]), float(base.get("std", 0.0))
    if kind == "band":
        width = band_width(spec, mean, std)
        ok = abs(g - mean) <= width
        return Check(run, metric, kind, mean, got, f"{mean:.4g} ± {width:.3g}", "pass" if ok else "FAIL",
                     "" if ok else f"{g:.4g} outside {mean:.4g} ± {width:.3g} (std {std:.3g})")
    if kind == "ratio":
        tol, min_s = float(spec["tol"]), float(spec.get("min_seconds", 0.0))
        band = f"<= {tol:g} x {mean:.3g}"
        if mean < min_s:
            return Check(run, metric, kind, mean, got, f"{band} (runs >= {min_s:g}s)", "skip")
        ok = g <= tol * mean  # only a slowdown is a regression
        return Check(run, metric, kind, mean, got, band, "pass" if ok else "FAIL",
                     "" if ok else f"{g:.3g}s is more than {tol:g}x the baseline {mean:.3g}s")
    raise ValueError(f"baseline: unknown check kind {kind!r} for metric {metric!r}")


def check_floors(run: str, minimum: dict[str, float], maximum: dict[str, float], res: dict[str, Any]) -> list[Check]:
    """The suite's floors for one run: ``min`` (e.g. test accuracy) and ``max`` (e.g. test loss)."""
    out = []
    for bounds, op in ((minimum, ">="), (maximum, "<=")):
        for metric, limit in bounds.items():
            g = _num(res.get(metric))
            ok = g is not None and math.isfinite(g) and (g >= limit if op == ">=" else g <= limit)
            reason = "" if ok else f"{_fmt(res.get(metric))} is not {op} the suite floor {limit:g}"
            out.append(Check(run, metric, "floor", limit, res.get(metric), f"{op} {limit:g}",
                             "pass" if ok else "FAIL", reason))
    return out


def compare(results: dict[str, dict[str, Any]], baseline: dict[str, Any], floors: dict[str, tuple[dict, dict]],
            suite_runs: list[str]) -> list[Check]:
    """All checks of the measured ``results`` (run -> metrics or ``{"error"}``) against ``baseline``.

    ``floors`` maps a run to its (min, max) floors; ``suite_runs`` are all runs of the suite index (a
    baseline entry outside it is a failure, an entry not run this time because of ``--only`` is not).
    """
    specs = {**DEFAULT_CHECKS, **baseline.get("checks", {})}
    base_runs = baseline.get("runs", {})
    out: list[Check] = []
    for run, res in results.items():
        if "error" in res:
            out.append(Check(run, "run", "completes", "ok", res["error"], "no error", "FAIL",
                             f"run crashed: {res['error']}"))
            continue
        base = base_runs.get(run)
        if base is None:
            out.append(Check(run, "baseline", "entry", None, "-", "entry exists", "FAIL",
                             "no baseline entry for this suite run (record one: compactfl nightly --calibrate N)"))
        else:
            for metric, spec in specs.items():
                if spec["kind"] == "limit":
                    if metric in res:
                        out.append(check_metric(run, metric, spec, None, res[metric]))
                    continue
                recorded = base.get("stats", {}).get(metric) if spec["kind"] in BANDED_KINDS \
                    else base.get("exact", {}).get(metric)
                if metric in res or recorded is not None:
                    out.append(check_metric(run, metric, spec, recorded, res.get(metric)))
        lo, hi = floors.get(run, ({}, {}))
        out.extend(check_floors(run, lo, hi, res))
    for run in sorted(set(base_runs) - set(suite_runs)):
        out.append(Check(run, "baseline", "entry", "recorded", "-", "run in suite", "FAIL",
                         "baseline entry for a run that is not in the suite (removed or renamed? recalibrate)"))
    return out
