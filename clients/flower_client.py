"""What one Flower client computes, free of Flower types: local training and evaluation of the global model.

The ClientApp (``clients/app.py``) only decodes messages and calls these functions, so they are unit-tested
without Ray. Every client rebuilds the training-time model from the config seed (a frozen CSG generator
is therefore identical everywhere and never travels), loads the received global trainable state, trains
``engine.local_epochs`` with the shared loop at the learning rates the server sent for the round (the run's
schedule on the global epoch count) and returns only ``models.trainable_state``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import models
from pipeline.config import RunConfig
from pipeline.modeling import build_training_model
from pipeline.train import evaluate, fit, resolve_device, seed_everything
from pipeline.transport.compact_space import compact_space
from pipeline.transport.wire import config_from_json, config_to_json


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The RNG seed of one client in one round: a pure function, so a resumed run repeats it exactly."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id * 101) % 2**31


def proximal_penalty(model: nn.Module, mu: float):
    """FedProx term ``mu/2 * ||w - w_global||^2`` over the trainable parameters (global = weights at entry)."""
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def penalty(_model: nn.Module) -> torch.Tensor:
        return 0.5 * mu * sum(((p - w0) ** 2).sum() for p, w0 in anchors)

    return penalty


def build_client_loss(cfg: RunConfig, device: torch.device):
    """CE, or KD/AT against the run's frozen teacher when the config asks for distillation."""
    from pipeline.distill import build_loss

    return build_loss(cfg.distill, _process_teacher(config_to_json(cfg), str(device)))


@functools.lru_cache(maxsize=2)
def _process_teacher(cfg_json: str, device: str) -> nn.Module | None:
    """The run's teacher, loaded once per client process (ClientApps are re-created per message, the process
    is not): rounds reuse it instead of re-reading it, and a teacher logit cache survives across rounds."""
    from pipeline.teacher import get_teacher

    return get_teacher(config_from_json(cfg_json), device)


def local_train(cfg: RunConfig, global_state: dict[str, torch.Tensor], *, partition_id: int, num_partitions: int,
                server_round: int, lrs: list[float], proximal_mu: float = 0.0,
                receive: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, float]] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the global model on one partition, local epoch ``e`` at ``lrs[e]``; returns (trainable state, metrics).

    ``receive(model, global_state)`` puts the received state into the freshly built model and returns extra
    metrics (compact-space ExpandNets lift it into the node's own factors); default: load it as it is.
    """
    from pipeline.data import client_train_loader

    epochs = cfg.engine.local_epochs if cfg.engine.kind == "flower" else 1
    if len(lrs) != epochs or not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise ValueError(f"round {server_round}: the server sent learning rates {lrs}, expected {epochs} "
                         "positive values (one per local epoch)")
    seed_everything(client_seed(cfg.seed, server_round, partition_id))
    device = resolve_device(cfg.device)
    model = build_training_model(cfg)
    received = {} if receive is None else receive(model, global_state)
    if receive is None:
        models.load_trainable_state(model, global_state)
    model.to(device)
    loader = client_train_loader(cfg, partition_id, num_partitions)
    penalty = proximal_penalty(model, proximal_mu) if proximal_mu > 0 else None
    first_epoch = (server_round - 1) * epochs  # a global epoch count: rounds see fresh shuffles/augmentations

    def before_epoch(epoch: int) -> None:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(first_epoch + epoch)

    history = fit(model, loader, cfg.train, epochs=epochs, loss_fn=build_client_loss(cfg, device), device=device,
                  penalty=penalty, lr_of=lrs.__getitem__, before_epoch=before_epoch)
    state = {k: v.detach().cpu().clone() for k, v in models.trainable_state(model).items()}
    last = history[-1]
    metrics = {"num-examples": int(last["train_samples"]), "train-loss": float(last["train_loss"]),
               "train-accuracy": float(last["train_accuracy"]), "train-seconds": float(sum(r["train_seconds"]
                                                                                          for r in history)),
               **received}
    return state, metrics


def local_evaluate(cfg: RunConfig, global_state: dict[str, torch.Tensor], *, partition_id: int,
                   num_partitions: int) -> dict[str, Any]:
    """Accuracy of the finalised (compact) global model on this client's shard of the test set."""
    from pipeline.data import test_shard_loader

    device = resolve_device(cfg.device)
    space = compact_space(cfg)
    if space is None:
        model = build_training_model(cfg)
        models.load_trainable_state(model, global_state)
    else:  # the global state is in the compact wire layout: the server's materialisation of it
        model = space.materialize(global_state)
    compact = models.finalize(model).to(device)
    result = evaluate(compact, test_shard_loader(cfg, partition_id, num_partitions), device)
    return {"num-examples": int(result["test_samples"]), "test-loss": float(result["test_loss"]),
            "test-accuracy": float(result["test_accuracy"])}
