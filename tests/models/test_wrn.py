"""Wide ResNets and Moonshine cheap blocks: counts vs the paper's Tables 3/4, structure, SPEC parser, cheapen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models.cheap import Bottleneck, ConvPair, GroupedPointwise, parse_block

# Moonshine Table 3 (CIFAR-10) and Table 4 (CIFAR-100): WRN-40-2 with each block, params + BN running stats.
TABLE3_C10 = {
    "S": 2248954, "S-2x2": 1012474, "G(2)": 1369530, "G(4)": 825210, "G(8)": 553050, "G(16)": 416970,
    "G(N/16)": 651834, "G(N/8)": 466362, "G(N/4)": 373626, "G(N/2)": 327258, "G(N)": 304074,
    "B(2)": 437242, "B(4)": 155002, "BG(2,2)": 292090, "BG(2,4)": 219514, "BG(2,8)": 183226,
    "BG(2,16)": 165082, "BG(2,M/8)": 195322, "BG(2,M/4)": 171130, "BG(2,M/2)": 159034,
    "BG(2,M)": 152986, "BG(4,M)": 85450,
    # Table 3 prints 234704 for BG(2,M/16): a digit transposition of 243706, which is Table 4's 255316 minus
    # the 11610 extra FC parameters of 100 classes (the difference every other row of the two tables shows).
    "BG(2,M/16)": 243706,
}
TABLE4_C100 = {
    "S": 2260564, "S-2x2": 1024084, "G(2)": 1381140, "G(4)": 836820, "G(8)": 564660, "G(16)": 428580,
    "G(N/16)": 663444, "G(N/8)": 477972, "G(N/4)": 385236, "G(N/2)": 338868, "G(N)": 315684,
    "B(2)": 448852, "B(4)": 166612, "BG(2,2)": 303700, "BG(2,4)": 231124, "BG(2,8)": 194836,
    "BG(2,16)": 176692, "BG(2,M/16)": 255316, "BG(2,M/8)": 206932, "BG(2,M/4)": 182740,
    "BG(2,M/2)": 170644, "BG(2,M)": 164596, "BG(4,M)": 97060,
}
REDUCED = [("wrn-16-2", 10, 693498), ("wrn-40-1", 10, 566650), ("wrn-16-1", 10, 175994),
           ("wrn-16-2", 100, 705108), ("wrn-40-1", 100, 572500), ("wrn-16-1", 100, 181844)]


def moonshine_count(name: str, num_classes: int = 10, block: str = "S") -> int:
    return models.count_params(models.build(name, num_classes=num_classes, block=block), include_buffers=True)


@pytest.mark.parametrize(("num_classes", "table"), [(10, TABLE3_C10), (100, TABLE4_C100)])
def test_wrn_40_2_counts_match_moonshine_tables(num_classes: int, table: dict[str, int]) -> None:
    got = {block: moonshine_count("wrn-40-2", num_classes, block) for block in table}
    assert got == table


@pytest.mark.parametrize(("name", "num_classes", "expected"), REDUCED)
def test_reduced_wrn_counts(name: str, num_classes: int, expected: int) -> None:
    assert moonshine_count(name, num_classes) == expected


def test_count_without_buffers_excludes_running_stats() -> None:
    m = models.build("wrn-16-1")
    stats = sum(mod.running_mean.numel() * 2 for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    assert models.count_params(m) == 175994 - stats


@pytest.mark.parametrize("block", ["S", "S-2x2", "G(4)", "G(N)", "B(2)", "BG(2,M/4)", "BG(2,N/8)"])
def test_forward_shapes_and_group_features(block: str) -> None:
    m = models.build("wrn-10-2", num_classes=7, block=block)
    x = torch.randn(2, 3, 32, 32)
    logits, feats = m(x, return_features=True)
    assert logits.shape == (2, 7)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8)]
    torch.testing.assert_close(m(x), logits)
    assert len(m.forward_features(x)) == 3


def test_stem_and_shortcuts_follow_the_wrn_layout() -> None:
    m = models.build("wrn-16-1")
    assert m.conv.weight.shape == (16, 3, 3, 3)
    assert m.group1[0].shortcut is None  # 16 -> 16: identity
    assert m.group2[0].shortcut.weight.shape == (32, 16, 1, 1) and m.group2[0].shortcut.stride == (2, 2)
    assert m.group3[0].shortcut.weight.shape == (64, 32, 1, 1)
    assert m.fc.in_features == 64 and len(m.group1) == 2


def test_moonshine_init() -> None:
    torch.manual_seed(0)
    m = models.build("wrn-40-2")
    w = m.group3[1].body.conv2.weight  # 128 x 128 x 3 x 3
    expected = (2.0 / (9 * 128)) ** 0.5  # N(0, sqrt(2 / (k*k*out_channels)))
    assert abs(w.std().item() / expected - 1) < 0.02 and abs(w.mean().item()) < 0.02 * expected
    gconv = models.build("wrn-10-2", block="G(4)").group3[0].body.conv1.gconv  # grouped: k*k*out too
    assert abs(gconv.weight.std().item() / (2.0 / (9 * 64)) ** 0.5 - 1) < 0.05
    assert torch.all(m.fc.bias == 0)
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0)
               for b in m.modules() if isinstance(b, nn.BatchNorm2d))


@pytest.mark.parametrize(("text", "canonical"), [
    ("S", "S"), ("s-2x2", "S-2x2"), ("G(4)", "G(4)"), ("G( N/8 )", "G(N/8)"), ("G(N)", "G(N)"),
    ("B(2)", "B(2)"), ("BG(2,M)", "BG(2,M)"), ("bg(2, m/16)", "BG(2,M/16)"), ("BG(4,8)", "BG(4,8)"),
])
def test_parse_block_canonical(text: str, canonical: str) -> None:
    assert str(parse_block(text)) == canonical


@pytest.mark.parametrize("bad", ["", "X", "G(3", "G(0)", "G()", "B(N)", "BG(2)", "G(M/2)", "S-3x3", "G(N/0)"])
def test_parse_block_rejects_bad_specs(bad: str) -> None:
    with pytest.raises(ValueError, match="block spec") as err:
        parse_block(bad)
    assert repr(bad) in str(err.value)


def test_groups_that_do_not_divide_raise_naming_the_layer() -> None:
    with pytest.raises(ValueError, match=r"G\(3\): 3 groups do not divide 16 channels \(group1\.0"):
        models.build("wrn-10-1", block="G(3)")
    with pytest.raises(ValueError, match="bottleneck 3 does not divide width 16"):
        models.build("wrn-10-1", block="B(3)")
    with pytest.raises(ValueError, match="depth must be 6n\\+4"):
        models.build("wrn-12-1")


def test_block_structures() -> None:
    g = models.build("wrn-10-1", block="G(4)").group2[0].body
    assert isinstance(g, ConvPair) and isinstance(g.conv1, GroupedPointwise)
    assert g.conv1.gconv.groups == 4 and g.conv1.gconv.in_channels == 16 and g.conv1.gconv.stride == (2, 2)
    assert g.conv1.pointwise.out_channels == 32
    b = models.build("wrn-10-2", block="BG(2,M/4)").group3[0].body
    assert isinstance(b, Bottleneck)
    assert (b.down.in_channels, b.down.out_channels, b.conv.groups, b.up.out_channels) == (64, 64, 16, 128)
    s2 = models.build("wrn-10-1", block="S-2x2").group1[0].body.conv1
    assert s2.kernel_size == (2, 2) and s2.dilation == (2, 2)


def test_cheapen_replaces_bodies_and_keeps_stem_shortcut_fc() -> None:
    plain = models.build("wrn-16-1")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    cheap = models.cheapen(plain, block="G(4)")
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())  # input untouched
    kept = [k for k in before if ".body." not in k]
    assert kept and all(torch.equal(cheap.state_dict()[k], before[k]) for k in kept)
    assert any("shortcut" in k for k in kept) and "fc.weight" in kept and "conv.weight" in kept
    assert all(isinstance(b.body.conv1, GroupedPointwise) for g in (cheap.group1, cheap.group2, cheap.group3)
               for b in g)
    assert models.count_params(cheap, include_buffers=True) == moonshine_count("wrn-16-1", block="G(4)")


def test_cheapen_updates_spec_so_the_student_rebuilds() -> None:
    cheap = models.cheapen(models.build("wrn-16-1", num_classes=100), block="bg(2,m)")
    spec = models.model_spec(cheap)
    assert spec == {"name": "wrn-16-1", "num_classes": 100, "kwargs": {"block": "BG(2,M)"}}
    rebuilt = models.build_from_spec(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in cheap.state_dict().items()}
    rebuilt.load_state_dict(cheap.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), cheap.eval()(x))


def test_cheapen_rejects_models_without_standard_blocks() -> None:
    with pytest.raises(TypeError, match="cannot cheapen CifarResNet"):
        models.cheapen(models.build("resnet20"), block="G(4)")


def test_wrn_is_listed_and_builds_through_the_registry() -> None:
    assert "wrn-D-K" in models.list_models()
    assert models.model_spec(models.build("wrn-40-2", block="G(4)"))["kwargs"] == {"block": "G(4)"}
