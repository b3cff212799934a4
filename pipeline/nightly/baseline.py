"""The nightly baseline file: per suite run, mean and spread over N seeds (bands) and exact values.

Only ``compactfl nightly --calibrate N`` writes it; a plain nightly run only reads it, and a missing file is
a failure (:class:`NightlyFailure`), never an empty baseline. The file records how it was made: commit,
date, host, seeds, PyTorch version, load average.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.nightly.checks import BANDED_KINDS, DEFAULT_CHECKS

NIGHTLY_THREADS = 2  # torch threads every suite run uses: the baseline's (the project's 2-core reference machine)

BASELINE_FORMAT = "compactfl-nightly-baseline/2"


class NightlyFailure(RuntimeError):
    """A failure that stops the nightly before any run (exit 1), e.g. a missing baseline file."""


def load_baseline(path: Path) -> dict[str, Any]:
    """The baseline document; a missing file is a :class:`NightlyFailure`, a malformed one a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise NightlyFailure(f"baseline {str(path)!r} does not exist (record one with: compactfl nightly "
                             f"--calibrate 3 --baseline {path})")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"nightly: baseline {path} is not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != BASELINE_FORMAT:
        raise ConfigError(f"nightly: baseline {path} is not a {BASELINE_FORMAT} file (recalibrate it)")
    return doc


def git_commit(cwd: Path | None = None) -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes), or ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict[str, Any]:
    """Where and when a measurement was made."""
    import torch

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "machine": platform.machine(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": NIGHTLY_THREADS, "loadavg_1min": load}


def summarize(per_seed: list[dict[str, Any]], checks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One baseline entry from the runs of one suite entry over seeds (the first seed is the suite's own).

    Banded metrics get mean, std (sample std; 0 with one seed) and the values; exact metrics are recorded
    from the first seed, the one a plain nightly run uses.
    """
    first = per_seed[0]
    stats, exact = {}, {}
    for metric, spec in checks.items():
        if spec["kind"] == "limit":
            continue
        if spec["kind"] in BANDED_KINDS:
            values = [float(r[metric]) for r in per_seed if r.get(metric) is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[metric] = {"mean": statistics.fmean(values), "std": std, "values": values}
        elif first.get(metric) is not None:
            exact[metric] = first[metric]
    return {"seeds": [r["seed"] for r in per_seed], "exact": exact, "stats": stats}


def write_baseline(path: Path, entries: dict[str, dict[str, Any]], previous: dict[str, Any] | None,
                   suite_runs: list[str], seeds: int, suite: str, overrides: list[str]) -> dict[str, Any]:
    """Write the calibrated ``entries`` (keeping earlier entries of runs still in the suite); returns the doc."""
    made_by = {**provenance(), "command": f"compactfl nightly --calibrate {seeds}", "seeds_per_run": seeds,
               "suite": suite, "overrides": overrides}
    runs = {k: v for k, v in (previous or {}).get("runs", {}).items() if k in suite_runs}
    # each entry keeps when and where it was calibrated (``--only`` recalibrates a few and keeps the rest)
    runs.update({k: {**v, "calibrated": {x: made_by[x] for x in ("commit", "date", "host", "loadavg_1min")}}
                 for k, v in entries.items()})
    doc = {
        "format": BASELINE_FORMAT,
        "made_by": made_by,
        "checks": DEFAULT_CHECKS,
        "runs": {k: runs[k] for k in suite_runs if k in runs},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    return doc
