"""The nightly history: one JSON line per nightly in ``<output>/history.jsonl`` and a trend plot of it.

Drift over weeks is what a user looks for, not one diff: the trend PNG shows the key metrics of every
suite run across all recorded nightlies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HISTORY = "history.jsonl"
TREND_PNG = "nightly-trend.png"
KEY_METRICS = ("test_accuracy", "test_loss", "final_train_loss", "wall_seconds")


def append_history(output: Path, record: dict[str, Any]) -> Path:
    """Append one nightly (``started``, ``commit``, ``passed``, ``runs`` -> key metrics) to the history."""
    path = Path(output) / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return path


def read_history(output: Path) -> list[dict[str, Any]]:
    """All recorded nightlies, oldest first (lines that do not parse are skipped: a crashed writer)."""
    path = Path(output) / HISTORY
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def key_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The history's share of a nightly's results (crashed runs keep their error)."""
    return {run: ({"error": res["error"]} if "error" in res else {m: res.get(m) for m in KEY_METRICS})
            for run, res in results.items()}


def plot_trend(history: list[dict[str, Any]], path: Path, metrics: tuple[str, ...] = KEY_METRICS[:3]) -> Path | None:
    """One panel per metric, one line per suite run, x = nightly number; None when there is nothing to draw."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = sorted({run for rec in history for run in rec.get("runs", {})})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for run in runs:
            xs = [i for i, rec in enumerate(history) if isinstance(rec.get("runs", {}).get(run, {}).get(metric),
                                                                   int | float)]
            ys = [rec["runs"][run][metric] for rec in (history[i] for i in xs)]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=run)
        fails = [i for i, rec in enumerate(history) if not rec.get("passed", True)]
        for i in fails:
            ax.axvline(i, color="red", alpha=0.15, lw=4)
        ax.set_title(metric)
        ax.set_xlabel(f"nightly # (0 = {history[0].get('started', '?')}, red = failed)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
