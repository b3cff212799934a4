"""Every route of composing a kxk factor after a 1x1 one (per-filter products for many taps, one GEMM per group
in either orientation for few taps) equals running the two layers, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.expand_algebra import compose_pair


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("in_per_group", [3, 40])  # narrow and wide inputs: the two GEMM orientations
@pytest.mark.parametrize("kernel", [(1, 3), (3, 3), (7, 7)])  # few taps (one GEMM) and many (per filter)
def test_kxk_after_pointwise_equals_the_two_layers(groups: int, in_per_group: int, kernel: tuple[int, int]) -> None:
    torch.manual_seed(3)
    c, q, o = in_per_group * groups, 6 * groups, 4 * groups
    a = torch.randn(q, in_per_group, 1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(o, q // groups, *kernel, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, c, 9, 10, dtype=torch.float64)
    k = compose_pair(w, a, groups)
    assert k.shape == (o, in_per_group, *kernel)
    y_one = F.conv2d(x, k, groups=groups)
    y_two = F.conv2d(F.conv2d(x, a, groups=groups), w, groups=groups)
    torch.testing.assert_close(y_one, y_two, rtol=1e-12, atol=1e-12 * y_two.abs().max().item())
    g = torch.randn_like(y_one)
    grads_one = torch.autograd.grad(y_one, (a, w), g)
    grads_two = torch.autograd.grad(y_two, (a, w), g)
    for mine, ref in zip(grads_one, grads_two, strict=True):
        torch.testing.assert_close(mine, ref)
