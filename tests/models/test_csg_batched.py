"""CSG batched generation: one generator matmul per forward pass for all layers, same values and gradients."""

from __future__ import annotations

import copy
import pickle

import torch
from torch import nn

import models
from models.csg import csg_layers
from models.csg_layers import assemble


def _net(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return models.csg_compress(models.build("resnet20"), slice_shape=(8, 8, 3, 3), code_size=16, **kw).train()


def _count_generator_calls(net: nn.Module) -> list[int]:
    calls = [0]

    def hook(module, inputs, output) -> None:  # noqa: ANN001 - torch's hook signature
        calls[0] += 1

    net.csg_generator.register_forward_hook(hook)
    return calls


def _per_layer_filters(net: nn.Module) -> list[torch.Tensor]:
    """The reference: each layer generated alone, ``assemble(codes @ A.T)``."""
    gen = net.csg_generator
    return [assemble(nn.functional.linear(m.codes, gen.weight), m.out_channels, m.in_channels, gen.shape)
            for _, m in csg_layers(net)]


def test_one_generator_matmul_per_forward_pass() -> None:
    net = _net()
    calls = _count_generator_calls(net)
    x = torch.randn(2, 3, 8, 8)
    net(x).sum().backward()
    assert calls[0] == 1
    net(x)
    assert calls[0] == 2  # a new pass generates again (its own graph)
    net.eval()
    with torch.no_grad():
        net(x)
        net(x)  # eval caches per layer: no generation at all
    assert calls[0] == 3


def test_batched_filters_and_gradients_equal_per_layer_generation() -> None:
    net = _net()
    ref = copy.deepcopy(net)
    weights = [torch.randn(m.out_channels, m.in_channels, 3, 3) for _, m in csg_layers(net)]
    got = [m.generate() for _, m in csg_layers(net)]
    want = _per_layer_filters(ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    sum((g * r).sum() for g, r in zip(got, weights, strict=True)).backward()
    sum((w * r).sum() for w, r in zip(want, weights, strict=True)).backward()
    for (_, a), (_, b) in zip(csg_layers(net), csg_layers(ref), strict=True):
        torch.testing.assert_close(a.codes.grad, b.codes.grad)
    torch.testing.assert_close(net.csg_generator.weight.grad, ref.csg_generator.weight.grad)


def test_two_forwards_backpropagate_separately_and_updates_are_seen() -> None:
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    out1, out2 = net(x), net(x)
    out1.sum().backward()
    out2.sum().backward()  # each pass has its own generation graph
    layer = csg_layers(net)[0][1]
    grad = layer.codes.grad.clone()
    net.zero_grad()
    net(x).sum().backward()
    torch.testing.assert_close(grad, 2 * layer.codes.grad)
    before = layer.generate().detach()  # a partial pass (one layer) ...
    with torch.no_grad():
        layer.codes.mul_(3.0)  # ... then an update: the next request regenerates
    torch.testing.assert_close(layer.generate(), 3.0 * before)
    other = csg_layers(net)[1][1]  # layer 0 opened a new pass; another layer changes before taking its rows
    want = other.generate().detach()
    layer.generate()
    with torch.no_grad():
        other.codes.mul_(-1.0)
    torch.testing.assert_close(other.generate(), -want)


def test_partial_pass_survives_copy_pickle_and_data_changes() -> None:
    net = _net(binary=True)
    layer = csg_layers(net)[1][1]
    w0 = layer.generate()  # leaves a batch in flight, part of an autograd graph
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        torch.testing.assert_close(csg_layers(clone)[1][1].generate(), w0)
    layer.codes.data.mul_(0.5)  # invisible to version counters: invalidate_cache drops the shared batch too
    layer.invalidate_cache()
    torch.testing.assert_close(layer.generate(), 0.5 * w0)

