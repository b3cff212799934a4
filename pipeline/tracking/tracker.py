"""The tracker interface, the factory that opens a run's backends, and the calls engines make.

A :class:`Backend` (MLflow, TensorBoard) receives params/tags once, metrics per step, artifacts at the end.
A :class:`RunTracker` feeds every enabled backend of one run dir and keeps ``<run dir>/tracking.json``
(each backend's last logged step, the MLflow run id), so a resumed run continues the same MLflow run without logging a
step twice. A backend that raises (server down, bad URI, missing package) is switched off for that run with
ONE warning line: training and the run dir never depend on a tracker.

Engines call, one line each, from the process that owns the run dir (local process, Ray driver, Flower
server): :func:`track_history` after each epoch/round (or once after Ray's fit), :func:`track_finish` at the
end of ``finish_run``; ``compactfl export`` adds the ONNX file with :func:`track_artifact`.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.logging_utils import get_logger

log = get_logger("tracking")
STATE_FILE = "tracking.json"
DISABLE_ENV = "COMPACTFL_TRACKING"  # "off" (or 0/false/no) disables every tracker, whatever the config says
CUMULATIVE_KEYS = ("bytes_up", "bytes_down", "bytes_allreduce")
STEP_KEYS = ("epoch", "round")
ARTIFACT_FILES = ("config.yaml", "model.safetensors", "model.json", "metrics.json", "report.md", "model.onnx",
                  "run.log")
REPO_ROOT = Path(__file__).resolve().parents[2]


class Backend:
    """One tracking destination. ``start`` returns what to remember in tracking.json for a resume and sets
    ``continues`` when it picked up the run that tracking.json named (so it already has the earlier steps)."""

    name = "backend"
    continues = False

    def start(self, params: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifacts(self, paths: list[Path]) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------- what we log
def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> ``{"train.lr": "0.05", ...}`` (lists and None as their JSON text)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out or ({prefix[:-1]: "{}"} if prefix else {})
    return {prefix[:-1]: tree if isinstance(tree, str) else json.dumps(tree)}


def git_commit() -> str | None:
    """The checkout's commit (None when not a git checkout or git is missing)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """Tags to filter runs by: engine, model, compression, distillation, transport dtype / comm, git commit."""
    tags = {"engine": cfg.engine.kind, "model": cfg.model.name, "compression": cfg.compression.kind,
            "distill": cfg.distill.kind, "seed": str(cfg.seed)}
    if cfg.engine.kind == "flower":
        tags.update(strategy=str(cfg.engine.strategy), transport_dtype=cfg.transport.dtype,
                    codec="+".join(cfg.transport.codec) or "none")
    elif cfg.engine.kind == "ray":
        tags["comm"] = cfg.transport.comm
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (bools, strings, None and NaN are left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def step_of(record: dict[str, Any], index: int) -> int:
    """A history record's step: its epoch or round number, else its 1-based position."""
    for key in STEP_KEYS:
        if isinstance(record.get(key), int):
            return int(record[key])
    return index + 1


def step_metrics(history: list[dict[str, Any]], index: int) -> dict[str, float]:
    """Metrics of ``history[index]`` plus cumulative bytes up to it (so a resumed run continues the sums)."""
    metrics = {k: v for k, v in numeric(history[index]).items() if k not in STEP_KEYS}
    for key in CUMULATIVE_KEYS:
        if key in metrics:
            metrics[f"{key}_cumulative"] = float(sum(numeric(r).get(key, 0.0) for r in history[: index + 1]))
    return metrics


def tracking_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("off", "0", "false", "no")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------- the tracker
class RunTracker:
    """Feeds the enabled backends of one run dir; a failing backend is dropped with one warning line.

    ``logged`` holds each backend's last logged step: a backend that continues its earlier run (resume) skips
    the steps it already has; one that starts afresh (new MLflow server, TensorBoard just enabled) gets them all.
    """

    def __init__(self, run_dir: Path, backends: list[Backend], saved: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.backends = backends
        self.saved = saved
        self.state: dict[str, Any] = {}
        self.logged: dict[str, int] = {}
        self.state_unwritable = False

    def _call(self, backend: Backend, method: str, *args: Any) -> Any:
        try:
            return getattr(backend, method)(*args)
        except Exception as exc:  # a tracker must never lose a training run
            self.drop(backend, exc)
            return None

    def drop(self, backend: Backend | str, exc: BaseException) -> None:
        name = backend if isinstance(backend, str) else backend.name
        log.warning("tracking: %s disabled for this run (%s); training continues", name, _one_line(exc))
        self.backends = [b for b in self.backends if b is not backend]

    def save_state(self) -> None:
        if not self.state:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / STATE_FILE).write_text(json.dumps({**self.state, "logged": self.logged}, indent=2))
        except OSError as exc:  # resume would start a new tracked run; the training itself is unaffected
            if not self.state_unwritable:
                log.warning("tracking: cannot write %s (%s)", self.run_dir / STATE_FILE, _one_line(exc))
            self.state_unwritable = True

    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        before = self.saved.get("logged", {})
        for backend in list(self.backends):
            record = self._call(backend, "start", params, tags)
            if backend in self.backends:
                self.state[backend.name] = record or {}
                self.logged[backend.name] = int(before.get(backend.name, 0)) if backend.continues else 0
        self.save_state()

    def log_history(self, history: list[dict[str, Any]]) -> None:
        """Log to each backend the records past the last step it holds."""
        if not self.backends:
            return
        for i, record in enumerate(history):
            step = step_of(record, i)
            todo = [b for b in self.backends if step > self.logged[b.name]]
            metrics = step_metrics(history, i) if todo else {}
            for backend in todo:
                self._call(backend, "log_metrics", metrics, step)
                self.logged[backend.name] = step
        self.save_state()

    def finish(self, summary: dict[str, Any]) -> None:
        """Final summary metrics (``summary/<key>``), the run dir's artifacts, and the run's end."""
        paths = [self.run_dir / n for n in ARTIFACT_FILES] + sorted(self.run_dir.glob("*.png"))
        final = {f"summary/{k}": v for k, v in numeric(summary).items()}
        for backend in list(self.backends):
            self._call(backend, "log_metrics", final, self.logged[backend.name])
            self._call(backend, "log_artifacts", [p for p in paths if p.is_file()])
            self._call(backend, "finish", "FINISHED")
        self.save_state()


def _load_state(run_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def open_tracker(cfg: RunConfig, run_dir: Path) -> RunTracker:
    """Open the backends ``cfg.tracking`` enables for ``run_dir`` (resume: the MLflow run of tracking.json)."""
    run_dir = Path(run_dir)
    state = _load_state(run_dir) if cfg.resume else {}
    tracker = RunTracker(run_dir, [], state)
    if tracking_disabled():
        return tracker
    settings = cfg.tracking
    if settings.mlflow.enabled:
        try:
            from pipeline.tracking.mlflow_backend import MlflowBackend

            tracker.backends.append(MlflowBackend(settings.mlflow, Path(cfg.output), cfg.name or run_dir.name,
                                                  state.get("mlflow")))
        except Exception as exc:
            tracker.drop("mlflow", exc)
    if settings.tensorboard.enabled:
        try:
            from pipeline.tracking.tensorboard_backend import TensorboardBackend

            tracker.backends.append(TensorboardBackend(run_dir, fresh="tensorboard" not in state.get("logged", {})))
        except Exception as exc:
            tracker.drop("tensorboard", exc)
    if tracker.backends:
        tracker.start(flatten(cfg.model_dump(mode="json")), run_tags(cfg))
    return tracker


# ------------------------------------------------------------------------------- calls the engines make
_OPEN: dict[str, RunTracker] = {}


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def tracker_for(cfg: RunConfig, run_dir: Path) -> RunTracker:
    """The open tracker of ``run_dir`` (opened on first use, in the process that owns the run dir)."""
    key = _key(run_dir)
    if key not in _OPEN:
        _OPEN[key] = open_tracker(cfg, run_dir)
    return _OPEN[key]


def _guarded(run_dir: Path, work) -> None:
    """Run ``work()``; anything unexpected switches tracking off for the run with one warning, never raises."""
    try:
        work()
    except Exception as exc:
        log.warning("tracking: disabled for this run (%s); training continues", _one_line(exc))
        _OPEN[_key(run_dir)] = RunTracker(run_dir, [], {})


def track_history(cfg: RunConfig, run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Log the per-epoch / per-round records of ``history`` not logged yet."""
    _guarded(run_dir, lambda: tracker_for(cfg, run_dir).log_history(history))


def track_finish(cfg: RunConfig, run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Log what is left of ``history``, the summary and the artifacts, and end the tracked run."""
    def finish() -> None:
        tracker = tracker_for(cfg, run_dir)
        tracker.log_history(history)
        tracker.finish(summary)

    _guarded(run_dir, finish)
    _OPEN.pop(_key(run_dir), None)


def track_artifact(run_dir: Path, path: Path) -> None:
    """Add a file made after the run (the ONNX export) to the MLflow run recorded in the run dir."""
    record = _load_state(run_dir).get("mlflow")
    if not record or tracking_disabled():
        return
    try:
        from pipeline.tracking.mlflow_backend import log_artifact_to_run

        log_artifact_to_run(record, Path(path))
    except Exception as exc:
        log.warning("tracking: mlflow could not store %s (%s)", path, _one_line(exc))


@atexit.register
def _end_open_runs() -> None:
    """Runs still open at exit did not reach finish_run: mark them failed (best effort)."""
    for key in list(_OPEN):
        tracker = _OPEN.pop(key)
        for backend in tracker.backends:
            try:
                backend.finish("FAILED")
            except Exception:  # exiting anyway: nothing left to protect
                pass
