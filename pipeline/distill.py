"""Distillation losses (KD, attention transfer) and the loss factory used by the training loop.

PLACEHOLDER INTERFACE: the distillation work fills in KD/AT. ``build_loss`` is the stable entry point.
"""

from __future__ import annotations

from torch import nn

from pipeline.config import NoDistill
from pipeline.train import LossFn, cross_entropy_loss


def build_loss(distill, teacher: nn.Module | None = None) -> LossFn:
    """The loss for a run: CE when ``distill`` is none, else KD or AT against a frozen ``teacher``."""
    if distill is None or isinstance(distill, NoDistill):
        return cross_entropy_loss
    raise NotImplementedError(f"distillation {distill.kind!r} is not implemented yet")
