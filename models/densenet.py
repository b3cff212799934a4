"""DenseNet-BC for CIFAR (Huang et al. 2017): bottleneck 1x1 -> 4k, 3x3 -> k, transitions compressing by 0.5.

Registered as the family ``densenet-bc-D-K`` (depth D, growth rate K), e.g. ``densenet-bc-40-48`` (2,733,130
parameters, the CSG paper's Table 1) and ``densenet-bc-40-36`` (1,542,682).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.base import FeatureNet
from models.registry import register


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(in -> 4k) -> BN-ReLU-conv3x3(4k -> k); the output is concatenated to the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        inter = 4 * growth
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (channel compression) followed by 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(FeatureNet):
    """DenseNet-BC: stem 3x3 conv to 2k channels, three dense blocks of (D-4)/6 bottlenecks, two transitions.

    ``forward_all`` returns the logits and the outputs of the three dense blocks (before each transition).
    """

    def __init__(self, depth: int = 40, growth: int = 48, compression: float = 0.5, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4 (n >= 1), got {depth}")
        if growth < 1:
            raise ValueError(f"DenseNet-BC growth rate must be positive, got {growth}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"DenseNet-BC compression must be in (0, 1], got {compression}")
        n = (depth - 4) // 6
        planes = 2 * growth
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        blocks, transitions = [], []
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(Bottleneck(planes, growth))
                planes += growth
            blocks.append(nn.Sequential(*layers))
            if i < 2:
                out_planes = int(math.floor(planes * compression))
                transitions.append(Transition(planes, out_planes))
                planes = out_planes
        self.block1, self.block2, self.block3 = blocks
        self.trans1, self.trans2 = transitions
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f1 = self.block1(self.conv1(x))
        f2 = self.block2(self.trans1(f1))
        f3 = self.block3(self.trans2(f2))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(f3)), 1).flatten(1)
        return self.fc(out), [f1, f2, f3]


@register("densenet-bc-D-K", pattern=r"densenet-bc-(\d+)-(\d+)")
def densenet_bc(depth: str, growth: str, num_classes: int = 10, compression: float = 0.5) -> DenseNetBC:
    return DenseNetBC(int(depth), int(growth), compression=compression, num_classes=num_classes)
