"""The ``ray`` engine: Ray Train V2 ``TorchTrainer`` over :func:`clients.ray_worker.train_func`, then finish_run.

The driver joins (or starts) a Ray cluster, runs ``engine.workers`` DDP workers with
``FailureConfig(max_failures=engine.max_failures)`` and per-epoch checkpoints under
``<storage>/<run name>``, rebuilds the training model from the final checkpoint and hands it to
:func:`pipeline.stages.finish_run` (finalise -> evaluate -> save -> report), like every engine.

Starting the same run name with the same storage again resumes from its latest checkpoint (after a driver
crash, or with more ``train.epochs``); a config that changes the outcome is refused before any worker starts
(:func:`check_ray_resume`); delete ``<storage>/<run name>`` to start from scratch.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, config_from_dict
from pipeline.logging_utils import get_logger
from pipeline.tracking import track_history

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # must be set before ray.train is first imported

log = get_logger("ray")
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- cluster
def address_reachable(address: str, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections at ``host:port`` (a live GCS, not a stale file)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def resolve_address(cfg: RunConfig) -> str:
    """Where to run: ``engine.address``, else ``RAY_ADDRESS``, else the live cluster of this node, else local.

    ``/tmp/ray/ray_current_cluster`` (written by ``ray start``/``ray up``) is used only when its GCS answers:
    a stale file left by a dead cluster would otherwise make ``ray.init`` wait on it for minutes.
    """
    if cfg.engine.address:
        return cfg.engine.address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.is_file():
        current = path.read_text().strip()
        if current and address_reachable(current):
            return current
        log.warning("ignoring stale Ray cluster file %s (%s does not answer); starting a local Ray. "
                    "Remove the file or run `ray stop` to silence this.", path, current or "empty")
    return "local"


def project_runtime_env(joining: bool) -> dict[str, Any] | None:
    """Runtime env that lets Ray workers import this project when it is a plain checkout (not installed).

    Ray already gives workers the driver's cwd and script dir; ``launch.py`` started elsewhere (``ray submit``
    runs it from ~) puts the checkout on sys.path itself, which workers would not inherit. The checkout path
    must then exist on every node (``ray_cluster.yaml`` ships it to ~/compactfl everywhere).
    """
    root = REPO_ROOT
    if "site-packages" in root.parts or (joining and Path.cwd().resolve() == root):
        return None
    paths = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def connect(cfg: RunConfig) -> bool:
    """Initialise Ray for this driver (unless already done); True when this call started a local instance."""
    import ray

    if ray.is_initialized():
        return False
    address = resolve_address(cfg)
    if address == "local":
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 runtime_env=project_runtime_env(joining=False))
        log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))
        return True
    ray.init(address=address, log_to_driver=True, runtime_env=project_runtime_env(joining=True))
    log.info("joined Ray cluster at %s", address)
    return False


# -------------------------------------------------------------------------------------------- config
def storage_dir(cfg: RunConfig, run_dir: Path) -> Path:
    """Absolute Ray Train storage path (shared storage on multi-node clusters): engine.storage_path or run/ray."""
    base = cfg.engine.storage_path if cfg.engine.storage_path is not None else Path(run_dir) / "ray"
    return Path(base).expanduser().resolve()


def absolute_config(cfg: RunConfig) -> RunConfig:
    """The config with every filesystem path made absolute (workers may run in another directory)."""
    raw = cfg.model_dump(mode="json")

    def fix(section: dict[str, Any] | None, key: str) -> None:
        if section is not None and section.get(key) is not None:
            section[key] = str(Path(section[key]).expanduser().resolve())

    fix(raw, "output")
    fix(raw["data"], "root")
    fix(raw["engine"], "storage_path")
    fix(raw.get("teacher"), "checkpoint")
    if raw["compression"]["kind"] == "csg":
        fix(raw["compression"], "generator")
    return config_from_dict(raw)


def run_name(cfg: RunConfig, run_dir: Path) -> str:
    return cfg.name or Path(run_dir).name


def build_trainer(cfg: RunConfig, run_dir: Path, train_func: Callable[[dict[str, Any]], None] | None = None):
    """The TorchTrainer of a run (gloo on CPU, NCCL on GPU), checkpointing into ``storage_dir``.

    ``train_func`` defaults to :func:`clients.ray_worker.train_func` (tests pass a wrapper that injects faults).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if train_func is None:
        from clients.ray_worker import train_func

    eng = cfg.engine
    storage = storage_dir(cfg, run_dir)
    name = run_name(cfg, run_dir)
    resources = {"CPU": eng.cpus_per_worker, **({"GPU": 1} if eng.use_gpu else {})}
    return TorchTrainer(
        train_func,
        train_loop_config={"run": cfg.model_dump(mode="json")},
        torch_config=TorchConfig(backend="nccl" if eng.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=eng.workers, use_gpu=eng.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=eng.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


def load_final(cfg: RunConfig, checkpoint) -> tuple[Any, list[dict[str, Any]]]:
    """(training model with the checkpoint's weights, history) from a Ray checkpoint written by a worker."""
    from pipeline.checkpoint import load_epoch_checkpoint
    from pipeline.modeling import build_training_model
    from pipeline.train import build_optimizer

    model = build_training_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    with checkpoint.as_directory() as d:
        history = load_epoch_checkpoint(Path(d), model, optimizer, cfg).history
    return model, history


def latest_ray_checkpoint(run_storage: Path) -> Path | None:
    """The newest epoch checkpoint folder a worker wrote under ``<storage>/<run name>`` (None: fresh run)."""
    from pipeline.checkpoint import has_epoch_checkpoint

    found = sorted(p for p in Path(run_storage).glob("epoch_*") if has_epoch_checkpoint(p))
    return found[-1] if found else None


def check_ray_resume(cfg: RunConfig, run_storage: Path) -> None:
    """Refuse, before any worker starts, to continue a run whose checkpoint has a config this one changes."""
    from pipeline.checkpoint import check_resume, epoch_checkpoint_config

    latest = latest_ray_checkpoint(run_storage)
    if latest is not None:  # the ray engine always continues a run name it finds
        check_resume(epoch_checkpoint_config(latest), cfg, latest,
                     remedy=f"use another name or delete {Path(run_storage)} to start over")


def comm_totals(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Run totals of the gradient exchange (per rank) for ``finish_run(extra=...)``."""
    total = sum(int(r.get("bytes_allreduce", 0)) for r in history)
    steps = sum(int(r.get("steps", 0)) for r in history)
    last = history[-1] if history else {}
    return {"bytes_allreduce": total, "allreduce_steps": steps,
            "bytes_per_step": total / steps if steps else 0.0,
            "comm": last.get("comm"), "workers": last.get("workers")}


# ----------------------------------------------------------------------------------------------- run
def run_ray(cfg: RunConfig, run_dir: Path, *, train_func: Callable[[dict[str, Any]], None] | None = None
            ) -> dict[str, Any]:
    """Train ``cfg`` on Ray Train workers, then finalise/evaluate/save through ``finish_run``; returns summary.

    ``train_func``: the per-worker function (default :func:`clients.ray_worker.train_func`).
    """
    from pipeline.stages import finish_run
    from pipeline.teacher import get_teacher

    started = time.perf_counter()
    run_dir = Path(run_dir)
    if cfg.engine.kind != "ray":
        raise ValueError(f"engine.kind: run_ray needs 'ray', got {cfg.engine.kind!r}")
    cfg = absolute_config(cfg)
    check_ray_resume(cfg, storage_dir(cfg, run_dir) / run_name(cfg, run_dir))
    get_teacher(cfg, "cpu")  # train/save a teacher spec once; every worker then loads the saved copy
    started_here = connect(cfg)
    try:
        import ray.train

        try:
            result = build_trainer(cfg, run_dir, train_func).fit()
        except ray.train.TrainingFailedError as exc:
            raise RuntimeError(f"ray engine: training of {run_name(cfg, run_dir)!r} failed: {exc}") from exc
        if result.checkpoint is None:
            raise RuntimeError(f"ray engine: run {run_name(cfg, run_dir)!r} produced no checkpoint")
        model, history = load_final(cfg, result.checkpoint)
        track_history(cfg, run_dir, history)  # from the driver: workers may sit on other nodes
    finally:
        if started_here:
            import ray

            ray.shutdown()
    for rec in history:
        log.debug("ray epoch %s: %s", rec.get("epoch"), rec)
    extra = {**comm_totals(history), "wall_seconds": time.perf_counter() - started,
             "ray_storage": str(storage_dir(cfg, run_dir) / run_name(cfg, run_dir))}
    return finish_run(cfg, model, history, run_dir, extra=extra)

