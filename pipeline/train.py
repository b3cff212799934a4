"""The one training loop, shared by the local, Flower and Ray engines (they differ only in orchestration).

``fit`` runs epochs of ``train_epoch`` with an optimizer and schedule built from :class:`TrainConfig`;
the loss comes from :func:`pipeline.distill.build_loss` (CE, KD or AT), and engines add what they need
through ``penalty`` (FedProx) or by wrapping the model (DDP) before calling.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig

# (model, images, labels) -> (loss, logits)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Penalty = Callable[[nn.Module], torch.Tensor]


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self, prefix: str = "train_") -> dict[str, float]:
        d = {f"{prefix}{k}": v for k, v in asdict(self).items()}
        d[f"{prefix}throughput"] = self.throughput
        return d


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch RNGs (one config seed drives them all)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU raises a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but no CUDA GPU is available")
    return torch.device(name)


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain supervised loss (the default when no distillation is configured)."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer over the parameters that require grad (frozen CSG generators etc. are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, epoch: int, horizon: int | None = None) -> float:
    """The learning rate of 0-based epoch ``epoch`` of a run: the one schedule definition of every engine.

    The LR changes per epoch (not per step). ``constant``: ``lr``; ``multistep``: ``lr * gamma**k`` with k the
    number of ``milestones`` <= epoch (as torch's MultiStepLR); ``cosine``: ``lr * (1 + cos(pi * e / H)) / 2``
    with H = ``horizon`` (default ``cfg.epochs``) and e clamped to H. Federated runs pass the global epoch
    ``(round - 1) * local_epochs + local epoch`` and H = ``rounds * local_epochs``.
    """
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if m <= epoch)
    if cfg.schedule == "cosine":
        total = max(horizon or cfg.epochs, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, total) / total))
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn = cross_entropy_loss,
    *,
    device: torch.device | str = "cpu",
    penalty: Penalty | None = None,
    max_batches: int | None = None,
    grad_clip: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> EpochStats:
    """One pass over ``loader``; returns mean loss, accuracy, samples and wall seconds.

    A non-finite loss raises a ValueError naming the batch, instead of silently corrupting the weights.
    """
    model.train()
    device = torch.device(device)
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if max_batches is not None and step >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits = loss_fn(model, x, y)
        if penalty is not None:
            loss = loss + penalty(model)
        value = loss.item()  # the step's one host sync on the loss
        if not math.isfinite(value):
            raise ValueError(f"training diverged: loss is {value} at batch {step} (lower train.lr?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        n = y.shape[0]
        total_loss += value * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        if on_step is not None:
            on_step(step, value)
    seconds = time.perf_counter() - start
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, seconds)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> dict[str, float]:
    """Eval-mode cross-entropy loss and accuracy over ``loader``."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.shape[0]
    model.train(was_training)
    loss = total_loss / max(seen, 1)
    return {"test_loss": loss if math.isfinite(loss) else float("nan"), "test_accuracy": correct / max(seen, 1),
            "test_samples": seen}


def fit(
    model: nn.Module,
    train_loader: Iterable,
    cfg: TrainConfig,
    *,
    epochs: int | None = None,
    loss_fn: LossFn = cross_entropy_loss,
    device: torch.device | str = "cpu",
    test_loader: Iterable | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr_of: Callable[[int], float] | None = None,
    start_epoch: int = 0,
    penalty: Penalty | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    before_epoch: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Train for ``epochs`` (default ``cfg.epochs``) starting at ``start_epoch``; returns per-epoch records.

    Each record holds ``epoch``, ``lr``, train loss/accuracy/throughput and, with ``test_loader``, test
    metrics. The LR of epoch ``e`` is ``lr_of(e)``, set at the epoch's start (default: :func:`lr_at` over
    ``epochs``), so a resumed run continues its schedule. ``on_epoch(epoch, record)`` runs after each epoch
    (checkpointing, progress, Ray reports).
    """
    epochs = cfg.epochs if epochs is None else epochs
    optimizer = optimizer or build_optimizer(model, cfg)
    lr_of = lr_of or (lambda e: lr_at(cfg, e, epochs))
    history = []
    for epoch in range(start_epoch, epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        lr = lr_of(epoch)
        set_lr(optimizer, lr)
        stats = train_epoch(model, train_loader, optimizer, loss_fn, device=device, penalty=penalty,
                            max_batches=cfg.max_batches, grad_clip=cfg.grad_clip)
        record = {"epoch": epoch + 1, "lr": lr, **stats.as_dict()}
        if test_loader is not None:
            record.update(evaluate(model, test_loader, device))
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    return history
