"""Run reports: ``report.md`` + PNG plots for one run, and a table + plot comparing several runs.

Plots use matplotlib's Agg backend (no display needed). Every engine's run dir gets the same three plots:
``curves.png`` (loss/accuracy per epoch or round), ``bytes.png`` (bytes per round/step) and ``params.png``
(train-time vs deploy-time parameters and MACs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PLOTS = ("curves.png", "bytes.png", "params.png")
BYTE_KEYS = ("bytes_up", "bytes_down", "bytes_allreduce")


def human_count(n: float | int | None) -> str:
    """1234567 -> '1.23M' (params, MACs)."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float | int | None) -> str:
    """Bytes in B / KiB / MiB / GiB."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _step_key(history: list[dict[str, Any]]) -> str:
    return "round" if history and "round" in history[0] else "epoch"


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    step = _step_key(history)
    for i, r in enumerate(history):
        if r.get(key) is not None:
            xs.append(r.get(step, i + 1))
            ys.append(r[key])
    return xs, ys


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss (left) and accuracy (right) per epoch/round, train and test."""
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_l), ("accuracy", ax_a)):
        for split in ("train", "test"):
            xs, ys = _series(history, f"{split}_{key}")
            if xs:
                ax.plot(xs, ys, marker="o", label=split)
        ax.set_xlabel(_step_key(history))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bytes(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Bytes exchanged per round/step (stacked by direction); a labelled empty plot for the local engine."""
    fig, ax = plt.subplots(figsize=(6, 4))
    step = _step_key(history)
    bottom = [0.0] * len(history)
    xs = [r.get(step, i + 1) for i, r in enumerate(history)]
    drawn = False
    for key in BYTE_KEYS:
        ys = [float(r.get(key) or 0) for r in history]
        if any(ys):
            ax.bar(xs, ys, bottom=bottom, label=key)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
            drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no communication (single-process run)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(step)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("bytes")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_params(summary: dict[str, Any], path: Path, title: str) -> None:
    """Train-time vs deploy-time parameters and MACs, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, what in zip(axes, ("params", "macs"), strict=True):
        vals = [summary.get(f"{what}_train") or 0, summary.get(f"{what}_deploy") or 0]
        bars = ax.bar(["train-time", "deploy-time"], vals, color=["tab:orange", "tab:blue"])
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(human_count(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom")
        ax.set_title("MACs" if what == "macs" else "parameters")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(quantity, train-time, deploy-time) rows shared by report.md and the console table."""
    acc = summary.get("test_accuracy")
    return [
        ("parameters", human_count(summary.get("params_train")), human_count(summary.get("params_deploy"))),
        ("MACs", human_count(summary.get("macs_train")), human_count(summary.get("macs_deploy"))),
        ("payload per transfer", human_bytes(summary.get("payload_bytes_train")),
         human_bytes(summary.get("payload_bytes_deploy"))),
        ("test accuracy", "", f"{acc:.4f}" if acc is not None else "-"),
        ("bytes exchanged", human_bytes(summary.get("bytes_total")), ""),
        *([("upload per client per round", human_bytes(summary["upload_bytes_per_client_round"]),
            f"{summary['upload_compression']}x smaller than dense fp32")]
          if summary.get("upload_compression") else []),
        ("wall time", f"{summary.get('wall_seconds', 0.0):.1f} s", ""),
    ]


def write_run_report(run_dir: Path, summary: dict[str, Any], history: list[dict[str, Any]],
                     config_yaml: str) -> list[Path]:
    """Write ``report.md`` and the PNG plots into ``run_dir``; returns the written paths."""
    run_dir = Path(run_dir)
    title = f"{summary.get('name')} ({summary.get('engine')}, {summary.get('model')}, {summary.get('compression')})"
    plot_curves(history, run_dir / "curves.png", title)
    plot_bytes(history, run_dir / "bytes.png", title)
    plot_params(summary, run_dir / "params.png", title)
    step = _step_key(history)
    hist_cols = [c for c in (step, "train_loss", "train_accuracy", "test_loss", "test_accuracy", *BYTE_KEYS,
                             "seconds") if any(c in r for r in history)]
    hist_rows = [[_fmt(r.get(c)) for c in hist_cols] for r in history]
    text = "\n\n".join([
        f"# Run report: {summary.get('name')}",
        f"Engine **{summary.get('engine')}**, model **{summary.get('model')}**, compression "
        f"**{summary.get('compression')}**, distillation **{summary.get('distill')}**, seed {summary.get('seed')}.",
        "## Summary",
        _md_table(["quantity", "train-time", "deploy-time"], [list(r) for r in summary_rows(summary)]),
        f"Finalisation gap (max |logit difference| trained vs deployed, one test batch): "
        f"{_fmt(summary.get('finalize_max_abs_diff'))}.",
        f"## Per {step}",
        _md_table(hist_cols, hist_rows) if hist_rows else "(no history)",
        "## Plots",
        "![curves](curves.png)\n\n![bytes](bytes.png)\n\n![params](params.png)",
        "## Resolved config",
        f"```yaml\n{config_yaml.rstrip()}\n```",
    ])
    (run_dir / "report.md").write_text(text + "\n")
    return [run_dir / "report.md", *(run_dir / p for p in PLOTS)]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ------------------------------------------------------------------------------------------ comparison
COMPARE_COLUMNS = ("name", "engine", "model", "compression", "distill", "params_train", "params_deploy",
                   "macs_train", "macs_deploy", "test_accuracy", "bytes_total", "wall_seconds")
COLUMN_TITLES = {"params_train": "params train", "params_deploy": "params deploy", "macs_train": "MACs train",
                 "macs_deploy": "MACs deploy", "test_accuracy": "accuracy", "bytes_total": "bytes exchanged",
                 "wall_seconds": "time (s)"}


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a run dir, with a one-line error when it is missing or broken."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ValueError(f"run dir {str(run_dir)!r} has no metrics.json (not a finished compactfl run?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from None


def comparison_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One summary dict per run dir (the COMPARE_COLUMNS subset, plus the run dir path)."""
    rows = []
    for d in run_dirs:
        s = read_metrics(d)["summary"]
        rows.append({"run_dir": str(d), **{c: s.get(c) for c in COMPARE_COLUMNS}})
    return rows


def cumulative_bytes(history: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(cumulative bytes up + down, test accuracy) after each round/step that carries both."""
    xs, ys, total = [], [], 0.0
    for r in history:
        total += float(sum(r.get(k) or 0 for k in BYTE_KEYS))
        if r.get("test_accuracy") is not None:
            xs.append(total)
            ys.append(float(r["test_accuracy"]))
    return xs, ys


def plot_accuracy_vs_bytes(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> bool:
    """Test accuracy against cumulative bytes (log x) per run; False (nothing written) when no run has bytes."""
    curves = [(name, *cumulative_bytes(hist)) for name, hist in runs]
    curves = [(n, xs, ys) for n, xs, ys in curves if xs and xs[-1] > 0]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7 if len(curves) <= 6 else 10, 4.5))
    styles = ("-", "--", ":", "-.")  # the colour cycle repeats after 10 curves: the line style tells them apart
    for i, (name, xs, ys) in enumerate(curves):
        ax.plot(xs, ys, marker="o", markersize=3, label=name, linestyle=styles[(i // 10) % len(styles)])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes (up + down, all clients)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, which="both")
    if len(curves) <= 6:
        ax.legend(fontsize=8)
    else:  # beside the axes, where it hides no curve
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def compare_runs(run_dirs: list[Path], out_dir: Path) -> tuple[list[dict[str, Any]], Path, Path]:
    """Compare runs: write ``comparison.md`` and ``comparison.png`` (test-accuracy curves) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(run_dirs)
    table = _md_table([COLUMN_TITLES.get(c, c) for c in COMPARE_COLUMNS],
                      [[_fmt_cell(c, r[c]) for c in COMPARE_COLUMNS] for r in rows])
    md = out_dir / "comparison.md"
    histories = [(str(r["name"]), read_metrics(d).get("history", [])) for d, r in zip(run_dirs, rows, strict=True)]
    pareto = plot_accuracy_vs_bytes(histories, out_dir / "accuracy_vs_bytes.png")
    md.write_text("# Run comparison\n\n" + table + "\n\n![comparison](comparison.png)\n"
                  + ("\n![accuracy vs bytes](accuracy_vs_bytes.png)\n" if pareto else ""))
    fig, (ax_acc, ax_size) = plt.subplots(1, 2, figsize=(11, 4))
    for d, r in zip(run_dirs, rows, strict=True):
        hist = read_metrics(d).get("history", [])
        xs, ys = _series(hist, "test_accuracy")
        if xs:
            ax_acc.plot(xs, ys, marker="o", label=r["name"])
    ax_acc.set_xlabel("epoch / round")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    names = [str(r["name"]) for r in rows]
    idx = range(len(rows))
    ax_size.bar([i - 0.2 for i in idx], [r["params_train"] or 0 for r in rows], width=0.4, label="train-time")
    ax_size.bar([i + 0.2 for i in idx], [r["params_deploy"] or 0 for r in rows], width=0.4, label="deploy-time")
    ax_size.set_xticks(list(idx), names, rotation=30, ha="right", fontsize=8)
    ax_size.set_ylabel("parameters")
    ax_size.legend()
    fig.tight_layout()
    png = out_dir / "comparison.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return rows, md, png


def _fmt_cell(col: str, v: Any) -> str:
    if col.startswith(("params", "macs")):
        return human_count(v)
    if col == "bytes_total":
        return human_bytes(v)
    if col == "wall_seconds":
        return f"{v:.1f}" if v is not None else "-"
    return _fmt(v)
