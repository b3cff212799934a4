"""Base class every registered network derives from: one forward that can also return stage features."""

from __future__ import annotations

import torch
from torch import nn


class FeatureNet(nn.Module):
    """A classifier whose forward can also return the outputs of its stages (used by attention transfer).

    Subclasses implement :meth:`forward_all`; ``forward(x)`` returns logits and ``forward(x,
    return_features=True)`` returns ``(logits, features)`` in a single pass, which also works through DDP.
    """

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_features: bool = False):  # noqa: D102
        logits, feats = self.forward_all(x)
        return (logits, feats) if return_features else logits

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of each stage/group, in order."""
        return self.forward_all(x)[1]
