"""``models.lift(spread=True)``: the minimal-norm change of ALL factors (``models.lift.spread_correction``).

Exactness as for the one-factor lift (float64, every reachable layer kind), and the property that motivates
it: lifting a factor-space gradient step's compact image reproduces that step to first order, where the
one-factor lift puts the whole change on one factor.
"""

from __future__ import annotations

import copy

import pytest
import torch

import models
from models.expandnets import expanded_layers
from models.lift import _lift_layer, spread_correction
from tests.models.test_lift import CASES, random_compact_state, rel_err

TOL = 1e-10
CG_ITERS = {"cl": 60, "ck": 200, "fc": 20}  # converged solves: CK's 3x3 chains are the worst conditioned


@pytest.mark.parametrize("strategy,make,rate", [pytest.param(*c[:3], id=c[4]) for c in CASES[:9]])
def test_spread_lift_is_exact_on_every_reachable_layer_kind(strategy, make, rate):
    torch.manual_seed(0)
    net = make().double()
    e = models.expand(net, strategy, rate=rate).double()
    target = random_compact_state(net, 1)
    report = models.lift(e, target, spread=True)
    assert not report.fallbacks
    got = models.trainable_state(models.contract(e))
    for x in report.layers:
        for t in ("weight", "bias"):
            key = f"{x.path}.{t}"
            if key in target:
                assert rel_err(got[key], target[key]) <= TOL, key


def _gradient_step(layer, lr: float, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The factors after one step ``-lr * dL/dW_j`` of the loss ``<G, K>`` (a random ``G``), and their kernel."""
    g = torch.Generator().manual_seed(seed)
    leaves = [c.weight.detach().clone().requires_grad_(True) for c in layer.chain]
    originals = [c.weight for c in layer.chain]
    for c, leaf in zip(layer.chain, leaves, strict=True):
        del c.weight
        c.weight = leaf
    kernel, _ = layer.composed(torch.float64)
    grads = torch.autograd.grad((torch.randn(kernel.shape, generator=g, dtype=torch.float64) * kernel).sum(), leaves)
    for c, w in zip(layer.chain, originals, strict=True):
        del c.weight
        c.weight = w
    stepped = [(w.detach() - lr * d) for w, d in zip(originals, grads, strict=True)]
    with torch.no_grad():
        saved = [c.weight.detach().clone() for c in layer.chain]
        for c, w in zip(layer.chain, stepped, strict=True):
            c.weight.copy_(w)
        target, _ = layer.composed(torch.float64)
        for c, w in zip(layer.chain, saved, strict=True):
            c.weight.copy_(w)
    return stepped, target.detach()


@pytest.mark.parametrize("strategy", ["cl", "ck", "fc"])
def test_lifting_a_gradient_steps_image_reproduces_the_step_to_first_order(strategy):
    torch.manual_seed(0)
    compact = models.build("smallnet7").double()
    layers = list(expanded_layers(models.expand(compact, strategy, rate=4).double()))
    path, layer = layers[-1] if strategy == "fc" else layers[1]  # the classifier / an inner conv
    errors = {}
    for lr in (1e-3, 1e-4):
        stepped, target = _gradient_step(layer, lr, seed=3)
        moved = [s - c.weight.detach() for s, c in zip(stepped, layer.chain, strict=True)]
        for spread in (True, False):
            trial = copy.deepcopy(layer)
            with torch.no_grad():
                if spread:
                    spread_correction(trial, target, steps=2, cg_iters=CG_ITERS[strategy])
                _lift_layer(path, trial, target, None)  # what lift() does next: the exact one-factor finish
                lifted_change = [t.weight.detach() - c.weight.detach() for t, c in zip(trial.chain, layer.chain,
                                                                                        strict=True)]
            num = sum(float((a - b).norm() ** 2) for a, b in zip(lifted_change, moved, strict=True)) ** 0.5
            errors[(lr, spread)] = num / sum(float(m.norm() ** 2) for m in moved) ** 0.5
    assert errors[(1e-4, True)] < 1e-4, (path, errors)  # the step itself, up to second-order terms ...
    assert errors[(1e-4, True)] < 0.05 * errors[(1e-3, True)], (path, errors)  # ... that shrink as lr**2
    assert errors[(1e-4, False)] > 0.2  # the one-factor lift alone reaches the same kernel by another change


def test_spread_leaves_an_unreachable_layer_as_it_was():
    """SmallNet-7's CK image conv (3->3->32->8) cannot reach a random kernel: no step is taken."""
    torch.manual_seed(0)
    e = models.expand(models.build("smallnet7").double(), "ck", rate=4).double()
    path, layer = next(iter(expanded_layers(e)))
    before = [c.weight.detach().clone() for c in layer.chain]
    target = torch.randn(layer.composed(torch.float64)[0].shape, dtype=torch.float64)
    residual = spread_correction(layer, target)
    assert residual > 0.1
    assert all(torch.equal(c.weight, b) for c, b in zip(layer.chain, before, strict=True)), path
