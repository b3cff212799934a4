"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: inverted residual blocks, linear bottlenecks.

CIFAR variant as in the common CIFAR ports: the stem conv and the second bottleneck row (24 channels) use
stride 1 instead of 2, so a 32x32 input reaches the head at 4x4. Otherwise the paper's Table 2: rows
(t, c, n, s) = (1,16,1,1) (6,24,2,1*) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), a 1x1 conv
to 1280, global average pooling, Linear. As in the paper (and torchvision), a block with expansion t=1
has no expansion conv, and a block adds its input only when stride is 1 and channels are unchanged.
``width_mult`` scales every width (rounded to multiples of 8, torchvision's rule); the head stays at least
1280 wide. Features for attention transfer: the outputs of the four resolution stages (32, 16, 8, 4 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import FeatureNet
from models.registry import register

# (expansion t, output channels c, repeats n, first stride s), grouped by output resolution on 32x32 inputs.
STAGES: tuple[tuple[tuple[int, int, int, int], ...], ...] = (
    ((1, 16, 1, 1), (6, 24, 2, 1)),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor`` without going more than 10% below it (torchvision)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
    """1x1 expansion (absent when t=1) -> 3x3 depthwise (stride) -> 1x1 linear projection, BN after each conv.

    Attribute names are stable (other code targets them): ``expand_conv`` (``None`` when t=1), ``dw_conv``,
    ``project_conv`` and their ``*_bn``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand_conv: nn.Conv2d | None = None
        self.expand_bn: nn.BatchNorm2d | None = None
        if expansion != 1:
            self.expand_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden)
        self.dw_conv = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.project_conv = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = x
        if self.expand_conv is not None:
            out = F.relu6(self.expand_bn(self.expand_conv(out)))
        out = F.relu6(self.dw_bn(self.dw_conv(out)))
        out = self.project_bn(self.project_conv(out))
        return x + out if self.use_residual else out


class MobileNetV2(FeatureNet):
    """CIFAR MobileNetV2: stride-1 stem ``conv1``/``bn1``, four ``stages`` of inverted residuals, head, ``fc``."""

    # CSG with pointwise slices compresses only the first 1x1 conv of each block (the paper's MobileNetV2 rows).
    csg_pointwise_targets = ("stages.*.expand_conv",)

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, int | float) or width_mult <= 0:
            raise ValueError(f"mobilenetv2 width_mult must be a positive number, got {width_mult!r}")
        in_ch = make_divisible(32 * width_mult)
        self.last_channels = make_divisible(1280 * max(1.0, width_mult))
        self.conv1 = nn.Conv2d(3, in_ch, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_ch)
        stages = []
        for rows in STAGES:
            blocks = []
            for t, c, n, s in rows:
                out_ch = make_divisible(c * width_mult)
                for i in range(n):
                    blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                    in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.conv_last = nn.Conv2d(in_ch, self.last_channels, 1, bias=False)
        self.bn_last = nn.BatchNorm2d(self.last_channels)
        self.fc = nn.Linear(self.last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # noqa: D102
        x = F.relu6(self.bn1(self.conv1(x)))
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        x = F.relu6(self.bn_last(self.conv_last(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)), feats


@register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)
