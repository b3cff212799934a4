"""CIFAR MobileNetV2: paper/torchvision layout, counts, stage features, width multiplier, stable block names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models.mobilenetv2 import InvertedResidual, make_divisible


def test_parameter_counts():
    # 1000 classes: 3,504,872 parameters, the count of torchvision's ImageNet MobileNetV2 (same layers).
    assert models.count_params(models.build("mobilenetv2", num_classes=1000)) == 3_504_872
    assert models.count_params(models.build("mobilenetv2")) == 2_236_682
    assert models.count_params(models.build("mobilenetv2", width_mult=0.5)) == 700_490


def test_forward_shapes_and_stage_features():
    net = models.build("mobilenetv2", num_classes=7).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits, feats = net(x, return_features=True)
    assert logits.shape == (1, 7)
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 32, 32), (32, 16, 16), (96, 8, 8), (320, 4, 4)]
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x)[-1], feats[-1])
        assert net(torch.randn(1, 3, 33, 33)).shape == (1, 7)  # global pooling: any input size


def test_block_structure_names_and_residuals():
    net = models.build("mobilenetv2")
    blocks = [b for stage in net.stages for b in stage]
    assert len(blocks) == 17 and all(isinstance(b, InvertedResidual) for b in blocks)
    assert blocks[0].expand_conv is None  # t = 1: no expansion conv
    for b in blocks[1:]:
        assert isinstance(b.expand_conv, nn.Conv2d) and b.expand_conv.kernel_size == (1, 1)
        assert b.dw_conv.groups == b.dw_conv.in_channels == b.expand_conv.out_channels
    assert [b.dw_conv.stride[0] for b in blocks].count(2) == 3  # 32 -> 16 -> 8 -> 4
    assert net.conv1.stride == (1, 1)
    assert sum(b.use_residual for b in blocks) == 10


def test_width_multiplier_and_bad_values():
    narrow = models.build("mobilenetv2", width_mult=0.35)
    assert narrow.conv1.out_channels == 16 and narrow.last_channels == 1280
    assert models.build("mobilenetv2", width_mult=1.4).last_channels == 1792
    assert make_divisible(32 * 0.35) == 16 and make_divisible(24 * 0.5) == 16
    for bad in (0, -1, True, "1"):
        with pytest.raises(ValueError, match="width_mult"):
            models.build("mobilenetv2", width_mult=bad)


def test_trains_one_step():
    torch.manual_seed(0)
    net = models.build("mobilenetv2", width_mult=0.35)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    before = net.fc.weight.clone()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert not torch.equal(before, net.fc.weight)
