"""Ray Train per-worker function: the shared training loop under DDP, with counted/compressed gradient exchange.

Every worker builds the same seeded training model (dense, CSG or expanded), loads its rank's shard of the
training set (``DistributedSampler`` semantics, seeded, reshuffled per epoch), wraps the model in DDP through
``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU) and runs :func:`pipeline.train.fit`. A DDP comm
hook (:mod:`pipeline.transport.ddp_hooks`) counts, and optionally compresses, the gradient bytes of every step.
Fused ExpandNets layers under ``transport.expand_sync: compact`` (the default) keep their factors out of DDP and
average the compact-size ``dL/dW``, ``dL/db`` instead (:mod:`pipeline.transport.compact_sync`: exact, at the
compact net's bytes); their factors are broadcast from rank 0 at start and at every checkpoint.

After each epoch the ranks pool their BatchNorm running statistics (:mod:`clients.bn_stats`: the statistics
of the union of the shards, not rank 0's shard), evaluate their shard of the test set, combine metrics with
one allreduce, and call ``ray.train.report``; rank 0 attaches a checkpoint (safetensors model + optimizer + RNG
+ epoch + history, written by :mod:`pipeline.checkpoint`). A restarted attempt resumes from
``ray.train.get_checkpoint()``. RNGs are re-seeded from (seed, rank, epoch) at every epoch start, so a resumed
run draws the same augmentations as an uninterrupted one; each epoch's learning rate is
:func:`pipeline.train.lr_at` of its epoch, so a resumed run continues its schedule.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clients.bn_stats import pool_bn_statistics
from models.expandnets import expanded_layers
from models.state import unwrap
from pipeline.config import RunConfig, config_from_dict
from pipeline.transport.compact_sync import CompactGradSync
from pipeline.transport.ddp_hooks import CommStats, register_comm_hook

CHECKPOINT_DIR = "epoch_{epoch:04d}"


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The RNG seed of one rank in one epoch (distinct per rank, reproducible across restarts)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


def shard_loaders(cfg: RunConfig, rank: int, world_size: int) -> tuple[Any, Any]:
    """(train loader over this rank's DistributedSampler shard, test loader over this rank's test shard).

    The per-worker batch is ``train.batch_size // world_size``, so the global batch matches a local run.
    """
    from pipeline.data import test_shard_loader, train_loader

    per_worker = cfg.train.model_copy(update={"batch_size": max(1, cfg.train.batch_size // world_size)})
    train = train_loader(cfg.model_copy(update={"train": per_worker}), rank=rank, world_size=world_size)
    return train, test_shard_loader(cfg, rank, world_size)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (identity when not distributed)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def epoch_record(record: dict[str, Any], test: dict[str, float], comm: tuple[int, int], seconds: float,
                 spec: str, world_size: int, device: torch.device) -> dict[str, Any]:
    """Merge one rank's epoch record into global metrics (sums over ranks) plus this rank's comm counters."""
    n = record["train_samples"]
    m = test["test_samples"]
    tl, ta, tn, el, ea, en = all_sum([record["train_loss"] * n, record["train_accuracy"] * n, n,
                                      test["test_loss"] * m, test["test_accuracy"] * m, m], device)
    bytes_sent, steps = comm
    out = dict(record)
    out.update({
        "train_loss": tl / max(tn, 1), "train_accuracy": ta / max(tn, 1), "train_samples": int(tn),
        "train_throughput": tn / record["train_seconds"] if record["train_seconds"] > 0 else 0.0,
        "test_loss": el / max(en, 1), "test_accuracy": ea / max(en, 1), "test_samples": int(en),
        "seconds": seconds, "bytes_allreduce": int(bytes_sent), "steps": int(steps),
        "bytes_per_step": bytes_sent / steps if steps else 0.0,
        "step_seconds": record["train_seconds"] / steps if steps else 0.0,
        "comm": spec, "workers": world_size,
    })
    return out


def progress_line(rec: dict[str, Any], epochs: int) -> str:
    """One human line per epoch: loss, accuracy, throughput and gradient bytes exchanged."""
    return (f"epoch {rec['epoch']}/{epochs}  loss {rec['train_loss']:.4f}  acc {rec['train_accuracy']:.4f}  "
            f"test_acc {rec['test_accuracy']:.4f}  {rec['train_throughput']:.0f} samples/s  "
            f"allreduce {rec['bytes_allreduce'] / 1e6:.3f} MB/rank ({rec['bytes_per_step'] / 1e3:.1f} kB/step "
            f"x {rec['steps']}, comm={rec['comm']})")


def install_compact_sync(model: nn.Module, cfg: RunConfig) -> CompactGradSync | None:
    """Compact gradient sync for a distributed run of a model with expanded layers under ``expand_sync:
    compact`` (None otherwise): its factors leave DDP's buckets, rank 0's factors are broadcast."""
    tr = cfg.transport
    if (tr.expand_sync != "compact" or not expanded_layers(model)
            or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)):
        return None
    sync = CompactGradSync(model, tr.comm, seed=cfg.seed, error_feedback=tr.error_feedback,
                           residual_decay=tr.residual_decay)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sync.factor_names())
    sync.broadcast_factors()
    return sync


def save_ray_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                        history: list[dict[str, Any]], cfg: RunConfig) -> tuple[Any, str]:
    """(ray.train.Checkpoint over a fresh temp dir, the temp dir) holding the state after ``epoch`` epochs."""
    from ray.train import Checkpoint

    from pipeline.checkpoint import save_epoch_checkpoint

    tmp = tempfile.mkdtemp(prefix="compactfl-ckpt-")
    save_epoch_checkpoint(Path(tmp), model, optimizer, epoch, history, cfg)
    return Checkpoint.from_directory(tmp), tmp


def train_func(config: dict[str, Any]) -> None:
    """The Ray Train ``train_loop_per_worker``: ``config = {"run": RunConfig dump}``."""
    import shutil

    import ray.train
    import ray.train.torch

    from pipeline.checkpoint import load_epoch_checkpoint
    from pipeline.distill import build_loss
    from pipeline.modeling import build_training_model
    from pipeline.teacher import get_teacher
    from pipeline.train import build_optimizer, evaluate, fit, seed_everything

    cfg = config_from_dict(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.engine.use_gpu else torch.device("cpu")
    seed_everything(epoch_seed(cfg.seed, rank, 0))

    model = build_training_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.train)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            resumed = load_epoch_checkpoint(Path(ckpt_dir), model, optimizer, cfg)
        start_epoch, history = resumed.epoch, resumed.history
        if rank == 0:
            print(f"[compactfl] resumed from checkpoint after epoch {start_epoch}", flush=True)

    loss_fn = build_loss(cfg.distill, get_teacher(cfg, device))
    train_loader, test_loader = shard_loaders(cfg, rank, world)
    sync = install_compact_sync(model, cfg)
    sync_stats = sync.stats if sync is not None else CommStats(spec=cfg.transport.comm)
    ddp = ray.train.torch.prepare_model(model, move_to_device=device,
                                        parallel_strategy_kwargs={"forward_sync_buffers": False})
    tr = cfg.transport
    stats = (register_comm_hook(ddp, tr.comm, seed=cfg.seed, error_feedback=tr.error_feedback,
                                residual_decay=tr.residual_decay)
             if isinstance(ddp, nn.parallel.DistributedDataParallel) else CommStats(spec=tr.comm))
    epochs = cfg.train.epochs
    mark: dict[str, Any] = {}

    def before_epoch(epoch: int) -> None:
        train_loader.set_epoch(epoch)
        seed_everything(epoch_seed(cfg.seed, rank, epoch))
        mark.update(t=time.perf_counter(), comm=stats.snapshot(), sync=sync_stats.snapshot())

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        (b0, s0), (c0, t0) = mark["comm"], mark["sync"]  # DDP buckets + compact sync of fused ExpandNets
        comm = (stats.bytes - b0 + sync_stats.bytes - c0, max(stats.steps - s0, sync_stats.steps - t0))
        if sync is not None:
            sync.broadcast_factors()  # every rank, before evaluation and rank 0's checkpoint: no drift
        pool_bn_statistics(unwrap(ddp), record["train_samples"])  # before evaluation, checkpoint, final model
        test = evaluate(unwrap(ddp), test_loader, device)
        rec = epoch_record(record, test, comm, time.perf_counter() - mark["t"], tr.comm, world, device)
        rec["start_epoch"] = start_epoch  # > 0: this epoch was trained by an attempt resumed from a checkpoint
        rec["bytes_last_step"] = stats.last_step_bytes + sync_stats.last_step_bytes
        history.append(rec)
        if rank == 0:
            print(f"[compactfl] {progress_line(rec, epochs)}", flush=True)
            ckpt, tmp = save_ray_checkpoint(unwrap(ddp), optimizer, epoch + 1, history, cfg)
            try:
                ray.train.report(rec, checkpoint=ckpt, checkpoint_dir_name=CHECKPOINT_DIR.format(epoch=epoch + 1))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(rec)

    if start_epoch < epochs:
        fit(ddp, train_loader, cfg.train, epochs=epochs, loss_fn=loss_fn, device=device, optimizer=optimizer,
            start_epoch=start_epoch, on_epoch=on_epoch, before_epoch=before_epoch)
