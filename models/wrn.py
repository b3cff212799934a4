"""Pre-activation Wide ResNets (Zagoruyko & Komodakis 2016) as used by Moonshine, with cheap blocks.

``models.build("wrn-D-K", block="G(4)")``: stem 3x3 conv to 16 channels; three groups of n = (D-4)/6
blocks of widths 16K, 32K, 64K with strides 1, 2, 2; each block is BN-ReLU then a body (two 3x3 convs for
``S``, a cheap body otherwise, see :mod:`models.cheap`) plus a shortcut: identity, or a 1x1 conv on the
pre-activated input when the width changes; final BN-ReLU, global average pool (the 8x8 pool of a 32x32
input) and FC. ``forward_features`` returns the three group outputs (the maps attention transfer uses).
Counts with BN running statistics match Moonshine's Tables 3 and 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import FeatureNet
from models.cheap import BlockSpec, make_body, moonshine_init_, parse_block
from models.registry import register


class PreActBlock(nn.Module):
    """One pre-activation residual block: ``bn`` -> ReLU -> ``body`` (+ identity or 1x1 ``shortcut``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, block: str | BlockSpec = "S", where: str = "") -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.bn = nn.BatchNorm2d(in_ch)
        self.body = make_body(block, in_ch, out_ch, stride, where or "block")
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if (in_ch != out_ch or stride != 1) else None
        )

    def rebuild_body(self, block: str | BlockSpec, where: str = "block") -> None:
        """Replace the body by a freshly initialised ``block`` body (used by ``models.cheapen``)."""
        self.body = make_body(block, self.in_ch, self.out_ch, self.stride, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn(x))
        # As in the reference WRN: the projection shortcut sees the pre-activated input, identity the raw one.
        return (x if self.shortcut is None else self.shortcut(o)) + self.body(o)


class WideResNet(FeatureNet):
    """WRN-depth-width with a chosen block SPEC for every residual block."""

    def __init__(self, depth: int, width: int, num_classes: int = 10, block: str | BlockSpec = "S") -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wrn depth must be 6n+4 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"wrn width must be >= 1, got {width}")
        spec = parse_block(block)
        n = (depth - 4) // 6
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        in_ch, groups = 16, []
        for gi, (ch, stride) in enumerate(((16 * width, 1), (32 * width, 2), (64 * width, 2))):
            blocks = []
            for i in range(n):
                blocks.append(PreActBlock(in_ch, ch, stride if i == 0 else 1, spec, f"group{gi + 1}.{i}"))
                in_ch = ch
            groups.append(nn.Sequential(*blocks))
        self.group1, self.group2, self.group3 = groups
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        moonshine_init_(self)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.conv(x)
        f1 = self.group1(x)
        f2 = self.group2(f1)
        f3 = self.group3(f2)
        out = F.adaptive_avg_pool2d(F.relu(self.bn(f3)), 1).flatten(1)
        return self.fc(out), [f1, f2, f3]


@register("wrn-D-K", pattern=r"wrn-(\d+)-(\d+)")
def wrn(depth: str, width: str, num_classes: int = 10, block: str = "S") -> WideResNet:
    """``wrn-40-2`` etc.; ``block`` is a Moonshine block SPEC (``S``, ``G(4)``, ``BG(2,M/8)``...)."""
    return WideResNet(int(depth), int(width), num_classes, block)
