"""CSG numerics: variance-preserving init, materialize == CSG model, gradients, eval cache, state loading."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import models
from models.csg import csg_layers, materialize
from models.csg_layers import CSGConv2d, SliceGenerator, assemble


def _randomize_bn(net: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.fixture(scope="module")
def csg20() -> nn.Module:
    torch.manual_seed(0)
    net = models.csg_compress(models.build("resnet20"), slice_shape=(12, 12, 3, 3), code_size=72)
    _randomize_bn(net)
    return net.eval()


def test_channel_block_slicing_follows_the_paper() -> None:
    # 2 x 3 slices of shape (2, 2, 1, 1): slice (a, b) must land at W[2a:2a+2, 2b:2b+2], cropped to 3 x 5.
    flat = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    w = assemble(flat, 3, 5, (2, 2, 1, 1))
    assert w.shape == (3, 5, 1, 1)
    for a in range(2):
        for b in range(3):
            block = flat[a * 3 + b].reshape(2, 2)[: 3 - 2 * a, : 5 - 2 * b]
            torch.testing.assert_close(w[2 * a:2 * a + 2, 2 * b:2 * b + 2, 0, 0], block)


@pytest.mark.parametrize("kwargs", [{}, {"binary": True}, {"code_size": 32}])
def test_generated_filters_have_kaiming_variance(kwargs: dict) -> None:
    torch.manual_seed(1234)
    net = models.csg_compress(models.build("resnet56"), **kwargs)
    ratios = []
    for _, layer in csg_layers(net):
        with torch.no_grad():
            w = layer.generate()
        ratios.append(float(w.var()) / (2.0 / layer.fan_in))
        assert abs(float(w.mean())) < 0.1 * math.sqrt(2.0 / layer.fan_in) * 10  # centred
    pooled = sum(ratios) / len(ratios)
    assert 0.93 < pooled < 1.07, pooled
    assert 0.6 < min(ratios) and max(ratios) < 1.5, (min(ratios), max(ratios))


def test_codes_adapt_to_a_pretrained_generator_scale() -> None:
    torch.manual_seed(5)
    big = torch.randn(2304, 64) * 7.0  # far from the fresh N(0, 1/n_c) draw
    net = models.csg_compress(models.build("resnet56"), code_size=64, generator=big, train_generator=False)
    ratios = []
    for _, layer in csg_layers(net):
        with torch.no_grad():
            ratios.append(float(layer.generate().var()) / (2.0 / layer.fan_in))
    assert 0.9 < sum(ratios) / len(ratios) < 1.1


def test_materialize_gives_plain_architecture_and_same_outputs(csg20: nn.Module) -> None:
    dense = materialize(csg20)
    ref = models.build("resnet20")
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert not csg_layers(dense) and not hasattr(dense, "csg_generator")
    assert csg_layers(csg20)  # input untouched
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(x), csg20(x))
        torch.testing.assert_close(models.finalize(csg20).eval()(x), csg20(x))
    ref.load_state_dict(dense.state_dict())  # loads into a freshly built plain model
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), csg20(x))


def test_to_compact_is_a_detached_conv_with_same_hyperparameters(csg20: nn.Module) -> None:
    layer = csg20.layer2[0].conv1
    conv = layer.to_compact()
    assert type(conv) is nn.Conv2d
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias) == \
        (16, 32, (3, 3), (2, 2), (1, 1), None)
    assert conv.weight.grad_fn is None and conv.weight.is_leaf
    torch.testing.assert_close(conv.weight, layer.weight)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), layer(x))


def test_train_mode_backprop_reaches_codes_and_shared_generator() -> None:
    torch.manual_seed(0)
    net = models.csg_compress(models.build("resnet20"), code_size=16).train()
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(m.codes.grad is not None and m.codes.grad.abs().sum() > 0 for _, m in csg_layers(net))
    g = net.csg_generator.weight.grad
    assert g is not None and g.abs().sum() > 0
    frozen = models.csg_compress(models.build("resnet20"), code_size=16, train_generator=False).train()
    frozen(torch.randn(2, 3, 16, 16)).sum().backward()
    assert frozen.csg_generator.weight.grad is None


def test_train_mode_regenerates_every_forward() -> None:
    torch.manual_seed(0)
    net = models.csg_compress(models.build("resnet20"), code_size=16).train()
    layer = net.layer1[0].conv1
    assert layer.weight is not layer.weight and layer._cache is None


def test_eval_cache_is_reused_and_invalidated(csg20: nn.Module) -> None:
    net = copy.deepcopy(csg20)
    layer = net.layer1[0].conv1
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = net(x)
        w0 = layer.weight
        assert layer.weight is w0                         # cached
        # An optimizer-style in-place update (version counter) is seen without any explicit call.
        layer.codes.mul_(2.0)
        assert layer.weight is not w0
        torch.testing.assert_close(layer.weight, 2.0 * w0)
        # A change invisible to version counters (.data) is picked up after invalidate_cache().
        layer.codes.data.mul_(0.5)
        layer.invalidate_cache()
        torch.testing.assert_close(layer.weight, w0)
        torch.testing.assert_close(net(x), y0)


def test_eval_cache_follows_load_trainable_state_and_load_state_dict(csg20: nn.Module) -> None:
    net = copy.deepcopy(csg20)
    x = torch.randn(2, 3, 16, 16)
    other = copy.deepcopy(csg20)
    with torch.no_grad():
        for _, m in csg_layers(other):
            m.codes.normal_()
        other.csg_generator.weight.normal_()
        expected = other(x)
        before = net(x)                                   # fills the caches
    assert not torch.allclose(before, expected)
    models.load_trainable_state(net, models.trainable_state(other))
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)
    fresh = copy.deepcopy(csg20)
    with torch.no_grad():
        fresh(x)
    fresh.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)


def test_cache_cleared_by_train_forward_and_not_used_when_grad_needed(csg20: nn.Module) -> None:
    net = copy.deepcopy(csg20)
    layer = net.layer1[0].conv1
    with torch.no_grad():
        net(torch.randn(1, 3, 8, 8))
    assert layer._cache is not None
    net.train()
    net(torch.randn(2, 3, 8, 8))
    assert layer._cache is None
    net.eval()
    for _ in range(2):  # eval mode with grad: regenerated each time, so backward works twice
        net(torch.randn(1, 3, 8, 8)).sum().backward()
    assert layer._cache is None and layer.codes.grad is not None


def test_deepcopy_and_pickle_keep_one_shared_generator(csg20: nn.Module) -> None:
    for clone in (copy.deepcopy(csg20), pickle.loads(pickle.dumps(csg20))):
        assert clone.csg_generator is not csg20.csg_generator
        assert all(m.generator is clone.csg_generator for _, m in csg_layers(clone))
        x = torch.randn(1, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), csg20(x))


def _other_shape(shape: tuple[int, int, int, int], code_size: int, **kw) -> nn.Module:
    return models.csg_compress(models.build("resnet20"), slice_shape=shape, code_size=code_size, **kw)


def test_loading_state_from_other_slice_shape_names_both_shapes() -> None:
    mine = _other_shape((16, 16, 3, 3), 128)
    theirs = _other_shape((12, 12, 3, 3), 72)
    with pytest.raises(ValueError, match=r"\[12, 12, 3, 3\].*\[16, 16, 3, 3\]"):
        models.load_trainable_state(mine, models.trainable_state(theirs))
    with pytest.raises(ValueError, match=r"\[12, 12, 3, 3\].*\[16, 16, 3, 3\]"):
        mine.load_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match=r"code size 64.*code size 128"):
        mine.load_state_dict(_other_shape((16, 16, 3, 3), 64).state_dict())
    # Frozen generators do not travel: the saved slice shape is inferred from the codes where possible.
    mine_f, theirs_f = _other_shape((16, 16, 3, 3), 128, train_generator=False), \
        _other_shape((8, 8, 3, 3), 128, train_generator=False)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.codes.*\[4, 128\].*\[16, 16, 3, 3\]"):
        models.load_trainable_state(mine_f, models.trainable_state(theirs_f))


def test_generator_state_dict_records_its_slice_shape() -> None:
    gen = SliceGenerator((16, 16, 3, 3), 8)
    other = SliceGenerator((8, 32, 3, 3), 8)
    with pytest.raises(ValueError, match=r"\[8, 32, 3, 3\].*\[16, 16, 3, 3\]"):
        gen.load_state_dict(other.state_dict())


@pytest.mark.parametrize(("shape", "code_size", "params"), [((16, 16, 3, 3), 128, 347_162),
                                                          ((12, 12, 3, 3), 72, 160_450)])
def test_payload_is_travelling_elements_plus_header(shape: tuple, code_size: int, params: int) -> None:
    # What travels: parameters + BN running stats (4,064 floats for resnet56, which the paper does not count)
    # as fp32 data, plus one safetensors header (8-byte length + JSON naming every tensor, ~24 KB here).
    dense = models.build("resnet56")
    csg = models.csg_compress(dense, shape, code_size)
    assert models.count_params(csg) == params
    for net in (dense, csg):
        blob = models.serialize_state(models.trainable_state(net))
        header = 8 + int.from_bytes(blob[:8], "little")
        assert len(blob) == models.payload_bytes(net)
        assert len(blob) - header == 4 * models.count_params(net, include_buffers=True)
        assert header < 30_000


def test_fp16_payload_halves_the_data() -> None:
    csg = models.csg_compress(models.build("resnet20"), code_size=128)
    half = models.payload_bytes(csg, "fp16") / models.payload_bytes(csg)
    assert 0.5 < half < 0.52


def test_double_precision_and_layer_repr() -> None:
    torch.manual_seed(0)
    net = models.csg_compress(models.build("resnet20"), code_size=8).eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        net(x.float())                        # fills the float32 caches; .double() must not reuse them
        net.double()
        torch.testing.assert_close(materialize(net).eval()(x), net(x))
    layer = net.layer1[0].conv1
    assert isinstance(layer, CSGConv2d) and "slice_shape=[16, 16, 3, 3]" in repr(layer)


def test_materialize_crops_partial_slices_densenet() -> None:
    # growth 6: the bottleneck 3x3 convs are 24 -> 6, so [4, 8, 3, 3] slices leave partial blocks both ways.
    torch.manual_seed(0)
    csg = models.csg_compress(models.build("densenet-bc-10-6"), slice_shape=(4, 8, 3, 3), code_size=16)
    _randomize_bn(csg)
    assert tuple(csg.block1[0].conv2.codes.shape) == (2 * 3, 16)
    dense = materialize(csg.eval())
    ref = models.build("densenet-bc-10-6")
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(x), csg(x))
