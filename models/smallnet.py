"""ExpandNets' CIFAR SmallNet: three conv-BN-ReLU-maxpool stages (3->8->16->32), FC 64, FC classes."""

from __future__ import annotations

import torch
from torch import nn

from models.base import FeatureNet
from models.registry import register


class SmallNet(FeatureNet):
    """SmallNet with ``kernel`` 3 (no padding, FC in 128) or 7 (padding 3, FC in 512); all layers have bias."""

    def __init__(self, kernel: int = 3, num_classes: int = 10, input_size: int = 32) -> None:
        super().__init__()
        if kernel not in (3, 7):
            raise ValueError(f"SmallNet kernel must be 3 or 7, got {kernel}")
        pad = 0 if kernel == 3 else kernel // 2
        chans = [3, 8, 16, 32]
        self.stages = nn.ModuleList()
        size = input_size
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            self.stages.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, kernel, padding=pad, bias=True),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            size = (size + 2 * pad - kernel + 1) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * size * size, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.classifier(x), feats


@register("smallnet3")
def smallnet3(num_classes: int = 10) -> SmallNet:
    return SmallNet(kernel=3, num_classes=num_classes)


@register("smallnet7")
def smallnet7(num_classes: int = 10) -> SmallNet:
    return SmallNet(kernel=7, num_classes=num_classes)
