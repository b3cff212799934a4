"""The nightly suite: its index (``suite.yaml``: runs, floors, runtime) and running one entry into metrics.

A suite is a folder of run configs plus ``suite.yaml``, which lists every run with its floor::

    runs:
      local_compact:                 # configs/nightly/local_compact.yaml
        min: {test_accuracy: 0.40}   # a run below its floor fails, whatever the baseline says
        max: {test_loss: 1.9}
      flower_fedavg:
        runtime: in-process          # Flower ServerApp + ClientApp on server.local_grid.LocalGrid (no Ray)
        min: {test_accuracy: 0.30}

A config in the folder that the index does not list, or an index entry without its config, is a config
error. Besides the run summary, each entry records probes that make silent regressions visible:
``train_lr`` (the optimizer's learning rate in the first epoch), ``first_batch_sha`` (checksum of the first
augmented training batch), ``teacher_test_accuracy`` (of a teacher trained in the run) and, for in-process
FedAvg runs, ``fedavg_round1_error`` (the round-1 global model against the num-examples-weighted mean of
the replies the grid delivered).

Every entry runs with ``NIGHTLY_THREADS`` torch threads, whatever the environment says: the short federated
runs are sensitive to the summation order, and the same code at 1 and 2 threads measured 0.322 vs 0.372
(``flower_robust_codec``), far outside its band.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.logging_utils import get_logger
from pipeline.nightly.baseline import NIGHTLY_THREADS

log = get_logger("nightly")
INDEX = "suite.yaml"
SUMMARY_METRICS = ("params_train", "params_deploy", "macs_train", "macs_deploy", "payload_bytes_train",
                   "payload_bytes_deploy", "bytes_total", "test_accuracy", "test_loss", "final_train_loss",
                   "wall_seconds")


class SuiteRun(BaseModel):
    """One suite entry: floors and how to run it."""

    model_config = ConfigDict(extra="forbid")
    min: dict[str, float] = Field(default_factory=dict, description="metric -> lowest acceptable value")
    max: dict[str, float] = Field(default_factory=dict, description="metric -> highest acceptable value")
    runtime: Literal["engine", "in-process"] = "engine"


NIGHTLY_EXPERIMENT = "compactfl-nightly"  # every suite run of every night in one MLflow experiment


class SuiteIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")
    runs: dict[str, SuiteRun]


class SuiteEntry:
    """A suite run: its name, config path and index settings."""

    def __init__(self, name: str, path: Path, spec: SuiteRun) -> None:
        self.name, self.path, self.spec = name, path, spec

    def config(self, overrides: list[str]) -> RunConfig:
        """The entry's validated run config with ``overrides`` (a bad one raises ConfigError naming the file)."""
        cfg = load_config(self.path, overrides)
        if self.spec.runtime == "in-process" and cfg.engine.kind != "flower":
            raise ConfigError(f"{INDEX}: {self.name}: runtime in-process is for flower configs, "
                              f"got engine {cfg.engine.kind}")
        return cfg


def load_suite(folder: Path) -> list[SuiteEntry]:
    """The suite's entries, in index order; every config in ``folder`` must be listed and vice versa."""
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        raise ConfigError(f"nightly: suite {str(folder)!r} has no {INDEX} (the list of runs and their floors)")
    try:
        doc = SuiteIndex.model_validate(yaml.safe_load(index.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"nightly: {index}: invalid suite index ({' '.join(first[:3])})") from None
    configs = {p.stem for p in folder.glob("*.yaml") if p.name != INDEX}
    missing = [n for n in doc.runs if n not in configs]
    if missing:
        raise ConfigError(f"nightly: {index} lists {missing[0]!r} but {folder / (missing[0] + '.yaml')} does not exist")
    unlisted = sorted(configs - set(doc.runs))
    if unlisted:
        raise ConfigError(f"nightly: {folder / (unlisted[0] + '.yaml')} is not listed in {index}")
    if not doc.runs:
        raise ConfigError(f"nightly: {index} lists no runs")
    return [SuiteEntry(n, folder / f"{n}.yaml", spec) for n, spec in doc.runs.items()]


# ---------------------------------------------------------------------------------------------- probes
def first_batch_sha(cfg: RunConfig) -> str:
    """Checksum of the first training batch as the run's loader yields it (augmentation included).

    Pixels are rounded to 1e-3 before hashing; recalibrate after a PyTorch upgrade changes the RNG.
    """
    from pipeline.data import client_train_loader, train_loader

    if cfg.engine.kind == "flower":
        loader = client_train_loader(cfg, 0, cfg.engine.clients)
    else:
        loader = train_loader(cfg)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    x, y = next(iter(loader))
    digest = hashlib.sha256(np.round(x.numpy().astype(np.float64) * 1000).astype(np.int32).tobytes())
    digest.update(y.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def first_epoch_lr(run_dir: Path) -> float | None:
    """The optimizer's learning rate in the first epoch, from the run's metrics.json (local and Ray runs)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    history = json.loads(path.read_text()).get("history") or []
    lr = history[0].get("lr") if history else None
    return float(lr) if lr is not None else None


def teacher_accuracy(cfg: RunConfig, run_dir: Path) -> float | None:
    """Test accuracy of the teacher a run trained for itself (``<run dir>/teacher``); None without one."""
    from pipeline.data import test_loader
    from pipeline.teacher import TEACHER_DIR, load_teacher_checkpoint
    from pipeline.train import evaluate

    folder = Path(run_dir) / TEACHER_DIR
    if cfg.teacher is None or cfg.teacher.model is None or not (folder / "model.safetensors").is_file():
        return None
    return float(evaluate(load_teacher_checkpoint(folder).eval(), test_loader(cfg))["test_accuracy"])


def _recording_grid(client_app: Any, num_nodes: int) -> Any:
    """A LocalGrid that keeps the train replies of round 1 and the model sent in round 2 (the round-1 global)."""
    from server.local_grid import LocalGrid

    class RecordingGrid(LocalGrid):
        def __init__(self) -> None:
            super().__init__(client_app, num_nodes)
            self.train_calls = 0
            self.round1_replies: list[Any] = []
            self.round2_sent: Any = None

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
            messages = list(messages)
            is_train = bool(messages) and messages[0].metadata.message_type.startswith("train")
            if is_train:
                self.train_calls += 1
                if self.train_calls == 2:
                    self.round2_sent = messages[0].content
            replies = list(super().send_and_receive(messages, timeout=timeout))
            if is_train and self.train_calls == 1:
                self.round1_replies = replies
            return replies

    return RecordingGrid()


def fedavg_round1_error(grid: Any) -> float | None:
    """Max |round-1 global - sum(n_i w_i) / sum(n_i)| over the replies the clients sent in round 1."""
    from pipeline.transport.wire import decode_record

    if grid.round2_sent is None or not grid.round1_replies:
        return None
    weighted, total = {}, 0.0
    for reply in grid.round1_replies:
        if reply.has_error():
            continue
        n = float(next(iter(reply.content.metric_records.values()))["num-examples"])
        state = decode_record(next(iter(reply.content.array_records.values())))
        for k, v in state.items():
            weighted[k] = weighted.get(k, 0.0) + n * v.double()
        total += n
    sent = decode_record(next(iter(grid.round2_sent.array_records.values())))
    return max(float((sent[k].double() - weighted[k] / total).abs().max()) for k in weighted)


def _plain_fedavg(cfg: RunConfig) -> bool:
    t = cfg.transport
    return (cfg.engine.strategy == "fedavg" and cfg.engine.rounds >= 2 and t.dtype == "fp32" and not t.codec
            and t.downlink.kind == "full")


# ------------------------------------------------------------------------------------------------ run
@contextlib.contextmanager
def pinned_threads(threads: int = NIGHTLY_THREADS) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads, restoring the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(entry: SuiteEntry, cfg: RunConfig, probes: dict[str, Any]) -> dict[str, Any]:
    """Train one entry on its runtime; returns the run summary (FedAvg's round-1 probe goes into ``probes``)."""
    from pipeline.engines import run_engine
    from pipeline.stages import prepare_run_dir

    if entry.spec.runtime != "in-process":
        return run_engine(cfg, prepare_run_dir(cfg))
    from clients.app import app as client_app
    from server.runner import run_server

    grid = _recording_grid(client_app, cfg.engine.clients)
    summary = run_server(grid, cfg, prepare_run_dir(cfg))
    if _plain_fedavg(cfg):
        probes["fedavg_round1_error"] = fedavg_round1_error(grid)
    return summary


def run_entry(entry: SuiteEntry, output: Path, overrides: list[str], seed: int | None = None) -> dict[str, Any]:
    """Run one suite entry (fresh) into ``output/runs/<name>[-seed<S>]``; its metrics or ``{"error": ...}``."""
    name = entry.name if seed is None else f"{entry.name}-seed{seed}"
    extra = [f"seed={seed}"] if seed is not None else []
    cfg = entry.config([f"tracking.mlflow.experiment={NIGHTLY_EXPERIMENT}", *overrides, *extra,
                        f"output={Path(output) / 'runs'}", f"name={name}", "resume=false"])
    run_dir = Path(cfg.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    probes: dict[str, Any] = {}
    try:
        with pinned_threads():
            probes["first_batch_sha"] = first_batch_sha(cfg)
            summary = _run(entry, cfg, probes)
    except Exception as exc:  # a crashing run is a regression, reported rather than aborting the suite
        log.error("nightly: %s failed: %s", name, exc)
        log.debug("%s", traceback.format_exc())
        text = str(exc).strip()
        return {"error": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"}
    lr, teacher = first_epoch_lr(run_dir), teacher_accuracy(cfg, run_dir)
    if lr is not None:
        probes["train_lr"] = lr
    if teacher is not None:
        probes["teacher_test_accuracy"] = teacher
    return {k: summary.get(k) for k in SUMMARY_METRICS if k in summary} | probes | {"seed": cfg.seed}
