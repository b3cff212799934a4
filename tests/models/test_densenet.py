"""DenseNet-BC: parameter counts of the CSG paper's Table 1, structure, features, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models.densenet import Bottleneck, DenseNetBC, Transition


@pytest.mark.parametrize(("name", "params"), [("densenet-bc-40-48", 2_733_130), ("densenet-bc-40-36", 1_542_682)])
def test_counts_match_csg_paper_table1(name: str, params: int) -> None:
    assert models.count_params(models.build(name)) == params


def test_family_is_registered_as_pattern() -> None:
    assert "densenet-bc-D-K" in models.list_models()
    net = models.build("densenet-bc-40-36", num_classes=100)
    assert net.fc.out_features == 100 and models.model_spec(net)["name"] == "densenet-bc-40-36"


def test_structure_bc_40_48() -> None:
    net = models.build("densenet-bc-40-48")
    blocks = [net.block1, net.block2, net.block3]
    assert [len(b) for b in blocks] == [6, 6, 6]
    first = blocks[0][0]
    assert isinstance(first, Bottleneck)
    assert (first.conv1.in_channels, first.conv1.out_channels, first.conv1.kernel_size) == (96, 192, (1, 1))
    assert (first.conv2.in_channels, first.conv2.out_channels, first.conv2.kernel_size) == (192, 48, (3, 3))
    # 96 + 6*48 = 384 -> transition to 192; 192 + 288 = 480 -> 240; 240 + 288 = 528 at the head.
    assert isinstance(net.trans1, Transition)
    assert (net.trans1.conv.in_channels, net.trans1.conv.out_channels) == (384, 192)
    assert (net.trans2.conv.in_channels, net.trans2.conv.out_channels) == (480, 240)
    assert net.fc.in_features == 528
    three_by_three = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(three_by_three) == 19  # stem + 18 bottleneck 3x3 convs


def test_forward_features_are_the_three_dense_block_outputs() -> None:
    net = DenseNetBC(depth=10, growth=4).eval()  # one bottleneck per block: tiny
    x = torch.randn(2, 3, 32, 32)
    logits, feats = net(x, return_features=True)
    assert logits.shape == (2, 10)
    assert [tuple(f.shape) for f in feats] == [(2, 12, 32, 32), (2, 10, 16, 16), (2, 9, 8, 8)]
    torch.testing.assert_close(net(x), logits)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(depth=41, growth=12), "6n\\+4"),
    (dict(depth=40, growth=0), "growth"),
    (dict(depth=40, growth=12, compression=0.0), "compression"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DenseNetBC(**kwargs)
