"""CSG compression: the paper's parameter counts, which layers are compressed, generator sharing, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models.csg import CSGConv2d, SliceGenerator, csg_layers, eligible_convs, load_generator, save_generator

# Table 1 / Table 4 of Omidvar et al. (2021), CIFAR-10. The partial-slice convention ceil(out/S0)*ceil(in/S1)
# codes per layer (footnote 2) reproduces every figure; a frozen or binary generator is not counted.
TABLE1 = [
    ("resnet56", None, 853_018),
    ("resnet56", ((16, 16, 3, 3), 128, {}), 347_162),
    ("resnet56", ((12, 12, 3, 3), 72, {}), 160_450),
    ("resnet56", ((16, 16, 3, 3), 1024, {"binary": True}), 381_978),
    ("resnet56", ((16, 16, 3, 3), 128, {"train_generator": False}), 52_250),  # pre-trained CSG (ResNet-20)
    ("densenet-bc-40-48", None, 2_733_130),
    ("densenet-bc-40-48", ((12, 12, 3, 3), 72, {}), 1_416_394),
    ("densenet-bc-40-48", ((12, 12, 3, 3), 72, {"binary": True}), 1_323_082),
    ("densenet-bc-40-36", ((12, 12, 3, 3), 72, {}), 842_842),
    ("densenet-bc-40-36", ((12, 12, 3, 3), 72, {"train_generator": False}), 749_530),
]


@pytest.mark.parametrize(("name", "csg", "params"), TABLE1, ids=[f"{n}-{p}" for n, _, p in TABLE1])
def test_parameter_counts_match_paper(name: str, csg, params: int) -> None:
    net = models.build(name)
    if csg is not None:
        shape, code_size, kw = csg
        net = models.csg_compress(net, slice_shape=shape, code_size=code_size, **kw)
    assert models.count_params(net) == params


def test_codes_shapes_count_partial_slices_whole() -> None:
    net = models.csg_compress(models.build("resnet56"), slice_shape=(12, 12, 3, 3), code_size=72)
    assert tuple(net.layer1[0].conv1.codes.shape) == (4, 72)        # 16x16: 2*2
    assert tuple(net.layer2[0].conv1.codes.shape) == (6, 72)        # 32 <- 16: 3*2
    assert tuple(net.layer3[1].conv2.codes.shape) == (36, 72)       # 64x64: 6*6
    assert tuple(net.csg_generator.weight.shape) == (12 * 12 * 9, 72)


def test_only_non_stem_3x3_convs_are_compressed_resnet20() -> None:
    net = models.build("resnet20")
    csg = models.csg_compress(net)
    assert type(csg.conv1) is nn.Conv2d                              # the stem reads the image
    names = [n for n, _ in csg_layers(csg)]
    assert len(names) == 18 and names[0] == "layer1.0.conv1" and names[-1] == "layer3.2.conv2"
    assert all(type(m) is not nn.Conv2d for n, m in csg.named_modules() if n in names)
    assert all(isinstance(m, nn.Conv2d) for m in net.modules() if "conv" in type(m).__name__.lower())  # untouched
    assert not hasattr(net, "csg_generator")


def test_densenet_compresses_only_bottleneck_3x3() -> None:
    net = models.build("densenet-bc-40-36")
    names = eligible_convs(net, (12, 12, 3, 3))
    assert len(names) == 18 and all(n.endswith(".conv2") for n in names)
    pointwise = eligible_convs(net, (12, 12, 1, 1), include_pointwise=True)
    assert len(pointwise) == 20  # 18 bottleneck 1x1 + 2 transitions
    assert eligible_convs(net, (12, 12, 1, 1)) == []


def test_mobilenetv2_first_pointwise_conv_of_each_block() -> None:
    net = models.build("mobilenetv2")
    assert net.csg_pointwise_targets == ("stages.*.expand_conv",)  # declared by the architecture
    expand = [(n, m) for n, m in net.named_modules() if n.endswith("expand_conv")]
    csg = models.csg_compress(net, slice_shape=(16, 16, 1, 1), code_size=16, include_pointwise=True)
    layers = csg_layers(csg)
    assert [n for n, _ in layers] == [n for n, _ in expand] and len(layers) == 16
    assert all(type(b.project_conv) is nn.Conv2d for stage in csg.stages for b in stage)
    assert type(csg.conv_last) is nn.Conv2d
    codes = sum(math.ceil(m.out_channels / 16) * math.ceil(m.in_channels / 16) for _, m in expand)
    dense_expand = sum(m.weight.numel() for _, m in expand)
    assert models.count_params(csg) == models.count_params(net) - dense_expand + 16 * codes + 256 * 16
    binary = models.csg_compress(net, (16, 16, 1, 1), 16, binary=True, include_pointwise=True)
    assert models.count_params(csg) - models.count_params(binary) == 4096  # paper: 1,595,322 - 1,591,226
    out = csg.eval()(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.plain = nn.Conv2d(16, 32, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(self.reflect(self.grouped(self.stem(x))))


def test_grouped_and_non_zero_padded_convs_are_not_eligible_bias_is_kept() -> None:
    net = _Grouped()
    csg = models.csg_compress(net, slice_shape=(8, 8, 3, 3), code_size=8)
    assert [n for n, _ in csg_layers(csg)] == ["plain"]
    torch.testing.assert_close(csg.plain.bias, net.plain.bias)
    assert "plain.bias" in models.trainable_state(csg)


def test_generator_is_shared_and_listed_once() -> None:
    csg = models.csg_compress(models.build("resnet20"))
    gens = {id(m.generator) for _, m in csg_layers(csg)}
    assert gens == {id(csg.csg_generator)}
    names = [n for n, _ in csg.named_parameters()]
    assert names.count("csg_generator.weight") == 1 and sum("generator" in n for n in names) == 1
    state = models.trainable_state(csg)
    assert "csg_generator.weight" in state
    assert not any(k.endswith("conv1.weight") and k != "conv1.weight" for k in state)  # no generated filters
    assert sum(v.numel() for k, v in state.items() if "running" not in k) == models.count_params(csg)


def test_frozen_and_binary_generators_do_not_travel() -> None:
    base = models.build("resnet20")
    frozen = models.csg_compress(base, train_generator=False)
    binary = models.csg_compress(base, code_size=32, binary=True)
    for net in (frozen, binary):
        assert net.csg_generator.weight.requires_grad is False
        assert "csg_generator.weight" not in models.trainable_state(net)
        assert not any("generator" in n for n, p in net.named_parameters() if p.requires_grad)
    values = binary.csg_generator.weight.unique()
    torch.testing.assert_close(values, torch.tensor([-1.0, 1.0]) / math.sqrt(32))


def test_compress_is_seeded_and_leaves_input_untouched() -> None:
    base = models.build("resnet20")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(3)
    a = models.csg_compress(base, code_size=16)
    torch.manual_seed(3)
    b = models.csg_compress(base, code_size=16)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert models.model_spec(a)["name"] == "resnet20"


def test_generator_save_load_and_share(tmp_path: Path) -> None:
    donor = models.csg_compress(models.build("resnet20"), code_size=128)
    path = tmp_path / "gen" / "resnet20.safetensors"
    save_generator(donor, path)
    gen = load_generator(path)
    assert isinstance(gen, SliceGenerator) and gen.shape == (16, 16, 3, 3) and gen.code_size == 128
    torch.testing.assert_close(gen.weight, donor.csg_generator.weight)
    shared = models.csg_compress(models.build("resnet56"), generator=gen, train_generator=False)
    assert models.count_params(shared) == 52_250
    torch.testing.assert_close(shared.csg_generator.weight, donor.csg_generator.weight)
    assert shared.csg_generator is not gen                       # copied: the donor is never modified
    also = models.csg_compress(models.build("resnet20"), generator=donor)  # a CSG model works too
    assert also.csg_generator.weight.requires_grad


def test_load_generator_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_generator(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_generator(junk)
    other = tmp_path / "other.safetensors"  # plain safetensors without CSG metadata
    other.write_bytes(models.serialize_state({"weight": torch.zeros(2304, 128)}))
    with pytest.raises(ValueError, match="save_generator"):
        load_generator(other)


def test_pipeline_builds_csg_from_config(tmp_path: Path) -> None:
    from pipeline.config import config_from_dict
    from pipeline.modeling import build_training_model

    donor = models.csg_compress(models.build("resnet20"), slice_shape=(12, 12, 3, 3), code_size=72)
    path = tmp_path / "g.safetensors"
    save_generator(donor, path)
    cfg = config_from_dict({"model": {"name": "resnet56"}, "compression": {
        "kind": "csg", "slice_shape": [12, 12, 3, 3], "code_size": 72, "generator": str(path),
        "train_generator": False}})
    a, b = build_training_model(cfg), build_training_model(cfg)
    assert models.count_params(a) == 160_450 - 12 * 12 * 9 * 72
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(slice_shape=(16, 16, 5, 5)), r"matches no eligible conv"),
    (dict(slice_shape=(16, 16, 1, 1)), r"include_pointwise=True"),
    (dict(slice_shape=(16, 16, 3)), r"4 positive integers"),
    (dict(slice_shape=(0, 16, 3, 3)), r"4 positive integers"),
    (dict(code_size=0), r"code_size must be an integer >= 1"),
    (dict(code_size=2.5), r"code_size must be an integer >= 1"),
    (dict(generator=nn.Linear(128, 100, bias=False)), r"\(100, 128\).*\(2304, 128\)"),
    (dict(generator=nn.Linear(128, 2304)), r"bias-free"),
    (dict(generator=SliceGenerator((8, 32, 3, 3), 128)), r"\[8, 32, 3, 3\].*\[16, 16, 3, 3\]"),
    (dict(generator=nn.ReLU()), r"ReLU"),
    (dict(binary=True, generator=nn.Linear(128, 2304, bias=False)), r"either binary or generator"),
])
def test_bad_input_gives_clear_errors(kwargs: dict, match: str) -> None:
    net = models.build("resnet20")
    with pytest.raises((ValueError, TypeError), match=match):
        models.csg_compress(net, **kwargs)


def test_compressing_twice_and_zero_generator_are_rejected() -> None:
    csg = models.csg_compress(models.build("resnet20"), code_size=8)
    with pytest.raises(ValueError, match="already CSG-compressed"):
        models.csg_compress(csg, code_size=8)
    with pytest.raises(ValueError, match="all zeros"):
        models.csg_compress(models.build("resnet20"), code_size=8, generator=torch.zeros(2304, 8))


def test_csg_layer_rejects_unfit_conv() -> None:
    gen = SliceGenerator((4, 4, 3, 3), 8)
    with pytest.raises(ValueError, match="groups=2"):
        CSGConv2d(nn.Conv2d(8, 8, 3, groups=2), gen)
    with pytest.raises(ValueError, match=r"kernel \(1, 1\)"):
        CSGConv2d(nn.Conv2d(8, 8, 1), gen)
