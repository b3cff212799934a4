"""models.lift: a lifted ExpandNet contracts to the received compact state (float64, 1e-10), minimally, honestly."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.expand_algebra import compose_chain
from models.expandnets import expanded_layers, set_mode
from models.lift import LiftReport, lift, seeded_expansion
from models.mobilenetv2 import InvertedResidual

TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_compact_state(compact: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A random target with the keys of ``models.trainable_state``: weights, biases, BN statistics (var > 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in models.trainable_state(compact).items():
        r = torch.randn(v.shape, generator=g, dtype=torch.float64)
        out[k] = torch.rand(v.shape, generator=g, dtype=torch.float64) + 0.5 if k.endswith("running_var") else r
    return out


class LiftNet(nn.Module):
    """Image conv -> BN -> the conv under test (bias, stride, groups) -> BN -> pool -> Linear -> classifier."""

    def __init__(self, kernel: int, stride: int = 1, groups: int | str = 1, bias: bool = True, cin: int = 4,
                 cout: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, padding=1, bias=bias)
        self.bn0 = nn.BatchNorm2d(cin)
        cout, g = (cin, cin) if groups == "dw" else (cout, groups)
        self.body = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=g,
                                            bias=bias), nn.BatchNorm2d(cout))
        self.fc1 = nn.Linear(cout, 6, bias=bias)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(F.relu(self.bn0(self.stem(x))))
        return self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1))))


def mobilenet_layers() -> nn.Module:
    """A stem and two MobileNetV2 inverted residuals (depthwise 3x3, stride 2, residual) as in the registry net."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                         InvertedResidual(8, 16, 2, 6), InvertedResidual(16, 16, 1, 6),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def lift_and_check(net: nn.Module, strategy: str, rate: float, mode: str, seed: int = 0,
                   x_shape: tuple[int, ...] = (2, 3, 11, 13)) -> LiftReport:
    """Lift a random compact state into a fresh expansion; its contraction and outputs equal the compact net's."""
    torch.manual_seed(seed)
    net = net.double()
    e = models.expand(net, strategy, rate=rate, mode=mode).double().eval()
    target = random_compact_state(net, seed + 1)
    report = models.lift(e, target)  # the package-level export
    assert not report.fallbacks, report
    assert {x.path for x in report.layers} == {p for p, _ in expanded_layers(e)}
    got = models.trainable_state(models.contract(e))
    assert got.keys() == target.keys()
    lifted = {f"{x.path}.{t}" for x in report.layers for t in ("weight", "bias")}
    for k, v in target.items():
        if k in lifted:
            assert rel_err(got[k], v) <= TOL, k
        else:
            assert torch.equal(got[k], v), k  # copied as it is
    assert set(report.copied) == set(target) - lifted
    assert all(x.residual <= TOL and x.bias_residual <= TOL for x in report.layers)
    assert all(x.map_rank == x.kernel_entries for x in report.layers)
    compact = copy.deepcopy(net).eval()
    models.load_trainable_state(compact, target)
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = compact(x)
    for m in ("fused", "explicit"):
        assert rel_err(set_mode(e, m)(x), y) <= TOL, m
    return report


CASES = [  # strategy, net, rate, (kind, factor) of the lifted layers in order; id
    ("cl", lambda: LiftNet(3, stride=2), 4, [("cl", 1), ("cl", 1)], "cl-3x3-stride2"),
    ("cl", lambda: LiftNet(5, groups=2, bias=False), 2, [("cl", 1), ("cl", 1)], "cl-5x5-groups2-nobias"),
    ("cl", lambda: LiftNet(7, stride=2, groups="dw"), 4, [("cl", 1), ("cl", 1)], "cl-7x7-depthwise-stride2"),
    ("ck", lambda: LiftNet(5, stride=2), 4, [("ck", 1)], "ck-5x5-stride2"),
    ("ck", lambda: LiftNet(7, stride=2, groups=2), 4, [("ck", 2)], "ck-7x7-groups2-stride2"),
    ("ck", lambda: LiftNet(5, groups="dw", bias=False), 4, [("ck", 1)], "ck-5x5-depthwise-nobias"),
    ("ck", lambda: LiftNet(7, groups="dw"), 4, [("ck", 1)], "ck-7x7-depthwise-middle-factor"),
    ("ck", lambda: LiftNet(5, cin=8, cout=2), 2, [("ck", 0)], "ck-5x5-first-factor"),
    ("fc", lambda: LiftNet(3), 4, [("fc", 1)], "fc"),
    ("cl+fc", lambda: LiftNet(3, stride=2, groups=2), 1, [("cl", 1), ("cl", 1), ("fc", 1)], "cl+fc-rate1"),
    ("ck+fc", lambda: LiftNet(7, stride=2), 4, [("ck", 2), ("fc", 1)], "ck+fc-7x7"),
    ("cl", mobilenet_layers, 4, [("cl", 1), ("cl", 1), ("cl", 1)], "cl-mobilenetv2-blocks"),
]


@pytest.mark.parametrize("mode", ["fused", "explicit"])
@pytest.mark.parametrize("strategy,make,rate,expected", [pytest.param(*c[:4], id=c[4]) for c in CASES])
def test_lift_reaches_every_reachable_layer_kind(strategy, make, rate, expected, mode):
    report = lift_and_check(make(), strategy, rate, mode)
    assert [(x.kind, x.factor) for x in report.layers] == expected


def test_smallnet7_cl_reaches_every_layer():
    torch.manual_seed(0)
    net = models.build("smallnet7").double()
    e = models.expand(net, "cl+fc", rate=4).double()
    target = random_compact_state(net, 2)
    report = lift(e, target)
    got = models.trainable_state(models.contract(e))
    assert not report.fallbacks and len(report.layers) == 4
    assert all(rel_err(got[k], v) <= TOL for k, v in target.items())


def test_smallnet7_ck_inner_layers_reach_and_the_image_conv_falls_back_honestly():
    """CK r=4: the inner 7x7 layers (last factor) and the FC chain are exact. The image conv 3->3->32->8 is not:
    each output channel's kernel is (a 1x3 row of 5x5 kernels) * W1, so the last factor's map has rank
    8 * 75 = 600 of 1,176, and no factor reaches a random kernel; lift reports the residual it leaves."""
    torch.manual_seed(0)
    net = models.build("smallnet7").double()
    e = models.expand(net, "ck+fc", rate=4).double()
    target = random_compact_state(net, 3)
    report = lift(e, target)
    got = models.trainable_state(models.contract(e))
    assert report.fallbacks == ["stages.0.0"]
    for x in report.layers[1:]:
        assert (x.kind, x.factor) == (("fc", 1) if x.path == "classifier.1" else ("ck", 2))
        assert rel_err(got[f"{x.path}.weight"], target[f"{x.path}.weight"]) <= TOL
        assert rel_err(got[f"{x.path}.bias"], target[f"{x.path}.bias"]) <= TOL
    first = report.layers[0]
    assert (first.kind, first.map_rank, first.kernel_entries) == ("ck", 600, 1176)
    w, t = got["stages.0.0.weight"], target["stages.0.0.weight"]
    assert first.residual == pytest.approx(((w - t).norm() / t.norm()).item(), rel=1e-9) and first.residual > 0.1
    assert rel_err(got["stages.0.0.bias"], target["stages.0.0.bias"]) <= TOL  # the bias still is exact
    assert report.max_residual == pytest.approx(first.residual)


@pytest.mark.parametrize("strategy,rate", [("cl", 0.5), ("fc", 0.5), ("ck", 2)])
def test_rank_losing_rates_fall_back(strategy, rate):
    """Rates below 1 (and CK 7x7 at r=2: 9*2n < 49m and 9*2m < 49n) cannot reach a random compact kernel."""
    torch.manual_seed(0)
    net = LiftNet(7, cin=6, cout=6).double()
    e = models.expand(net, strategy, rate=rate).double()
    report = lift(e, random_compact_state(net, 4))
    assert report.fallbacks == [x.path for x in report.layers] and report.layers
    assert all(x.map_rank < x.kernel_entries and x.residual > 1e-3 for x in report.layers)


@pytest.mark.parametrize("strategy,make", [("ck+fc", lambda: models.build("smallnet7")),
                                           ("cl+fc", lambda: LiftNet(5, stride=2, groups="dw"))])
def test_a_chain_that_already_contracts_to_the_target_is_left_unchanged(strategy, make):
    torch.manual_seed(0)
    e = models.expand(make(), strategy, rate=4).double()
    before = {k: v.clone() for k, v in e.state_dict().items()}
    report = lift(e, models.trainable_state(models.contract(e)))
    assert all(torch.equal(v, before[k]) for k, v in e.state_dict().items())
    assert report.max_residual == 0.0 and not report.fallbacks  # reached, even where the map is rank-deficient


def _brute_force_correction(layer: nn.Module, factor: int, target: torch.Tensor) -> torch.Tensor:
    """The minimal-norm change of one factor from the chain's full Jacobian (lstsq on the explicit matrix)."""
    ws = [c.weight.detach() for c in layer.chain]
    groups = getattr(layer.chain[0], "groups", 1)

    def kernel(wj: torch.Tensor) -> torch.Tensor:
        return compose_chain(ws[:factor] + [wj] + ws[factor + 1:], [None] * len(ws), groups)[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(kernel, ws[factor]).reshape(-1, ws[factor].numel())
    rhs = (target - kernel(ws[factor]).reshape(target.shape)).reshape(-1, 1)
    return torch.linalg.lstsq(jac, rhs, driver="gelsd").solution.reshape(ws[factor].shape)


@pytest.mark.parametrize("strategy,make,rate,factor", [
    pytest.param("cl", lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2)), 2, 1, id="cl-sandwich"),
    pytest.param("fc", lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 2, 1, id="fc-sandwich"),
    pytest.param("ck", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 3, 5)), 4, 1, id="ck-last"),
    pytest.param("ck", lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 1, 5)), 2, 0, id="ck-first"),
    pytest.param("ck", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 7, groups=2)), 4, 1,
                 id="ck-grouped-explicit-middle"),
])
def test_the_correction_is_minimal_norm(strategy, make, rate, factor):
    torch.manual_seed(0)
    net = make().double()
    e = models.expand(net, strategy, rate=rate).double()
    path, layer = expanded_layers(e)[-1]
    target = random_compact_state(net, 5)
    w_target = target[f"{path}.weight"]
    expected = _brute_force_correction(layer, factor, w_target.reshape(layer.to_compact().weight.shape))
    before = [c.weight.detach().clone() for c in layer.chain]
    report = lift(e, target)
    x = next(r for r in report.layers if r.path == path)
    assert x.factor == factor and not x.fallback
    change = layer.chain[factor].weight.detach() - before[factor]
    assert rel_err(change, expected) <= 1e-8
    others = [i for i in range(len(before)) if i != factor]
    assert all(torch.equal(layer.chain[i].weight, before[i]) for i in others)


def test_only_the_chosen_factor_and_the_last_bias_change():
    torch.manual_seed(0)
    e = models.expand(LiftNet(5, stride=2), "ck+fc", rate=4).double()
    before = {k: v.clone() for k, v in e.state_dict().items()}
    report = lift(e, random_compact_state(LiftNet(5, stride=2).double(), 6))
    changed = {k for k, v in e.state_dict().items() if not torch.equal(v, before[k]) and ".chain." in k}
    expected = set()
    for x in report.layers:
        n = len(dict(expanded_layers(e))[x.path].chain)
        expected |= {f"{x.path}.chain.{x.factor}.weight", f"{x.path}.chain.{n - 1}.bias"}
    assert changed == expected


def test_lift_accepts_exactly_the_compact_trainable_state():
    torch.manual_seed(0)
    net = LiftNet(5, stride=2).double()
    e = models.expand(net, "ck+fc", rate=4).double()
    good = random_compact_state(net, 7)
    before = {k: v.clone() for k, v in e.state_dict().items()}
    missing = {k: v for k, v in good.items() if k != "body.0.weight"}
    extra = dict(good, **{"body.0.chain.0.weight": torch.zeros(1)})
    bad_shape = dict(good, **{"fc1.weight": torch.zeros(6, 7, dtype=torch.float64)})
    for state, match in [(missing, r"missing key 'body\.0\.weight'"),
                         (extra, r"unexpected key 'body\.0\.chain\.0\.weight'"),
                         (bad_shape, r"'fc1\.weight': expected shape \(6, 8\), got \(6, 7\)")]:
        with pytest.raises(ValueError, match=match) as info:
            lift(e, state)
        assert "\n" not in str(info.value)
        assert all(torch.equal(v, before[k]) for k, v in e.state_dict().items())  # nothing was modified
    lift(e, {k: v.float() for k, v in good.items()})  # any float dtype: cast like load_trainable_state


def test_float32_model_lifts_to_rounding():
    torch.manual_seed(0)
    net = LiftNet(7, stride=2, groups=2)
    e = models.expand(net, "cl+fc", rate=2)
    target = {k: v.float() for k, v in random_compact_state(net, 8).items()}
    report = lift(e, target)
    assert not report.fallbacks and report.max_residual < 1e-5
    assert all(p.dtype == torch.float32 for p in e.parameters())


def test_a_node_without_factors_starts_from_the_seeded_expansion():
    net = models.build("smallnet7")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = seeded_expansion(net, "ck+fc", rate=4, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    b = seeded_expansion(net, "ck+fc", rate=4, seed=5, mode="explicit")
    c = seeded_expansion(net, "ck+fc", rate=4, seed=6)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.stages[1][0].chain[0].weight, c.stages[1][0].chain[0].weight)
    target = random_compact_state(net.double(), 9)
    report = lift(seeded_expansion(net, "cl+fc", rate=2, seed=5).double(), target)
    assert not report.fallbacks and report.max_residual <= TOL


def test_a_layer_whose_maps_are_too_large_to_form_falls_back_unchanged(monkeypatch):
    lift_module = importlib.import_module("models.lift")
    monkeypatch.setattr(lift_module, "MAX_MAP_ENTRIES", 0)  # CK has no sandwich factor: no candidate is left
    torch.manual_seed(0)
    net = LiftNet(5).double()
    e = models.expand(net, "ck", rate=4).double()
    before = [c.weight.detach().clone() for c in e.body[0].chain]
    target = random_compact_state(net, 10)
    k_before = e.body[0].to_compact().weight.detach()
    (x,) = lift(e, target).layers
    assert x.fallback and x.map_rank == 0
    assert all(torch.equal(c.weight, b) for c, b in zip(e.body[0].chain, before, strict=True))
    t = target["body.0.weight"]
    assert x.residual == pytest.approx(((k_before - t).norm() / t.norm()).item(), rel=1e-12)


def test_a_shared_expanded_layer_is_refused():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    e = models.expand(nn.Sequential(conv, nn.ReLU(), conv), "cl", rate=2)
    with pytest.raises(ValueError, match="shared by '0', '2'"):
        lift(e, models.trainable_state(models.contract(e)))


@pytest.mark.parametrize("strategy,make,rate", [pytest.param(*c[:3], id=c[4]) for c in CASES])
def test_balance_equalises_factor_norms_and_keeps_the_contraction(strategy, make, rate):
    """Rescaled factors (one blown up, one shrunk, as repeated lifting leaves them) contract exactly as before,
    in float64, in both modes; a skipped layer is untouched."""
    torch.manual_seed(3)
    net = make().double()
    e = models.expand(net, strategy, rate=rate).double().eval()
    layers = expanded_layers(e)
    with torch.no_grad():
        for bn in (m for m in e.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
        for _, layer in layers:
            layer.chain[-1].weight.mul_(1e6)
            layer.chain[0].weight.mul_(1e-6)
            for conv in layer.chain:
                if conv.bias is not None:
                    conv.bias.normal_()
    before = models.trainable_state(models.contract(e))
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    y = set_mode(e, "fused")(x).detach()
    skipped = layers[0][0]
    untouched = [c.weight.detach().clone() for c in layers[0][1].chain]
    models.balance(e, skip=(skipped,))
    for path, layer in layers:
        norms = torch.stack([c.weight.detach().norm() for c in layer.chain])
        if path == skipped:
            assert all(torch.equal(a, c.weight) for a, c in zip(untouched, layer.chain, strict=True))
        else:
            assert (norms.max() / norms.min()).item() == pytest.approx(1.0, rel=1e-9), path
    after = models.trainable_state(models.contract(e))
    assert all(rel_err(after[k], v) <= TOL for k, v in before.items() if v.abs().max() > 0)
    for m in ("fused", "explicit"):
        assert rel_err(set_mode(e, m)(x), y) <= TOL, m
