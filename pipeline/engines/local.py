"""The local engine: one process, teacher -> train -> finish_run, with per-epoch checkpoints and resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.checkpoint import has_epoch_checkpoint, load_epoch_checkpoint, save_epoch_checkpoint
from pipeline.config import RunConfig
from pipeline.logging_utils import get_logger, progress
from pipeline.tracking import track_history

log = get_logger("engine")
CHECKPOINT_DIR = "checkpoints"  # the local engine's per-epoch checkpoints (the Flower server uses the same name)


def run_local(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Single-process training with per-epoch test evaluation and per-epoch checkpoints (``resume: true``)."""
    from pipeline.data import test_loader, train_loader
    from pipeline.distill import build_loss
    from pipeline.modeling import build_training_model
    from pipeline.stages import finish_run
    from pipeline.teacher import get_teacher
    from pipeline.train import build_optimizer, fit, resolve_device, seed_everything

    started = time.perf_counter()
    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    teacher = get_teacher(cfg, device)
    loss_fn = build_loss(cfg.distill, teacher)
    model = build_training_model(cfg).to(device)
    train_data = train_loader(cfg)
    eval_loader = test_loader(cfg)
    optimizer = build_optimizer(model, cfg.train)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    start_epoch, history = 0, []
    if cfg.resume and has_epoch_checkpoint(ckpt_dir):
        resumed = load_epoch_checkpoint(ckpt_dir, model, optimizer, cfg)
        start_epoch, history = resumed.epoch, resumed.history
        log.info("resumed from %s after epoch %d", run_dir, start_epoch)
    epochs = cfg.train.epochs
    tick = {"t": time.perf_counter()}

    def before_epoch(epoch: int) -> None:
        tick["t"] = time.perf_counter()
        if hasattr(train_data, "set_epoch"):  # seeded shuffling/augmentation continue exactly on resume
            train_data.set_epoch(epoch)

    with progress(epochs, "epoch", f"{cfg.name or 'run'} (local)", start=min(start_epoch, epochs)) as bar:
        def on_epoch(epoch: int, record: dict[str, Any]) -> None:
            record["seconds"] = time.perf_counter() - tick["t"]
            history.append(record)
            save_epoch_checkpoint(ckpt_dir, model, optimizer, epoch + 1, history, cfg)
            track_history(cfg, run_dir, history)
            bar.update(epoch + 1, record)

        if start_epoch < epochs:
            fit(model, train_data, cfg.train, loss_fn=loss_fn, device=device, test_loader=eval_loader,
                optimizer=optimizer, start_epoch=start_epoch, on_epoch=on_epoch,
                before_epoch=before_epoch)
    return finish_run(cfg, model, history, run_dir,
                      extra={"train_seconds": time.perf_counter() - started, "resumed_from_epoch": start_epoch})
