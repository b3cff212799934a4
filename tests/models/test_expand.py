"""ExpandNets: chain algebra, exact contraction, fused == explicit (values and gradients), API, bad inputs."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.expand_algebra import chain_plan, compose_chain, compose_pair
from models.expand_layers import ExpandedConv2d, ExpandedLinear
from models.expandnets import (
    STRATEGIES,
    contract,
    expand,
    expanded_layers,
    expansion_summary,
    init_from_expanded,
    set_mode,
)
from models.smallnet import SmallNet


# ------------------------------------------------------------------------------------ chain algebra
def _run_chain(x, weights, biases, groups):
    for w, b in zip(weights, biases, strict=True):
        x = F.conv2d(x, w, b, groups=groups)
    return x


def _rand_chain(widths, kernels, groups, with_bias):
    ws = [torch.randn(cout, cin // groups, *k, dtype=torch.float64)
          for cin, cout, k in zip(widths[:-1], widths[1:], kernels, strict=True)]
    bs = [torch.randn(cout, dtype=torch.float64) if on else None
          for cout, on in zip(widths[1:], with_bias, strict=True)]
    return ws, bs


@pytest.mark.parametrize("with_bias", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("kernels", [[(1, 1), (3, 5), (1, 1)], [(3, 3), (3, 3), (3, 3)], [(1, 1), (1, 1), (2, 3)]])
def test_compose_chain_equals_running_the_chain(kernels, groups, with_bias):
    torch.manual_seed(1)
    widths = [4, 8, 12, 4]
    ws, bs = _rand_chain(widths, kernels, groups, with_bias)
    x = torch.randn(2, 4, 11, 13, dtype=torch.float64)
    k, b = compose_chain(ws, bs, groups)
    assert (b is None) == (not any(with_bias))
    y_chain = _run_chain(x, ws, bs, groups)
    y_one = F.conv2d(x, k, b, groups=groups)
    torch.testing.assert_close(y_one, y_chain, rtol=1e-12, atol=1e-12 * y_chain.abs().max().item())


def test_compose_chain_linear_is_the_matrix_product():
    torch.manual_seed(2)
    ws = [torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)]
    bs = [torch.randn(6, dtype=torch.float64), None]
    w, b = compose_chain(ws, bs)
    torch.testing.assert_close(w, ws[1] @ ws[0])
    torch.testing.assert_close(b, ws[1] @ bs[0])


def test_every_composition_order_gives_the_same_kernel():
    torch.manual_seed(3)
    ws, bs = _rand_chain([4, 6, 8, 6, 2], [(1, 1), (3, 3), (3, 1), (1, 1)], 2, [True, False, True, True])
    ref = compose_chain(ws, bs, 2, plan=(((0, 1), 2), 3))
    for plan in [(0, (1, (2, 3))), ((0, 1), (2, 3)), (0, ((1, 2), 3)), ((0, (1, 2)), 3)]:
        k, b = compose_chain(ws, bs, 2, plan=plan)
        torch.testing.assert_close(k, ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, ref[1], rtol=1e-12, atol=1e-12)


def test_chain_plan_picks_the_cheap_order():
    # FC 512 -> 2048 -> 256 -> 64: (W3 W2) W1 needs 100M multiplies, W3 (W2 W1) 276M.
    assert chain_plan([(2048, 512), (256, 2048), (64, 256)]) == (0, (1, 2))
    assert chain_plan([(64, 16, 3, 3), (128, 64, 3, 3), (32, 128, 3, 3)]) == ((0, 1), 2)
    assert chain_plan([(5, 3)]) == 0


def test_compose_pair_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="do not fit"):
        compose_pair(torch.zeros(4, 3, 3, 3), torch.zeros(5, 2, 3, 3))


# ------------------------------------------------------------------------------------ layers and nets
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN running statistics and affine parameters (default ones make exactness tests trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, lo, hi in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2), (m.weight, 0.5, 1.5),
                                  (m.bias, -0.5, 0.5)):
                    if t is not None:
                        t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_exact(expanded: nn.Module, x: torch.Tensor) -> None:
    """float64: contracted / fused vs explicit chain rel. err <= 1e-10; float32: assert_close per the issue."""
    expanded = randomize_bn(expanded).eval()
    e64 = set_mode(expanded, "explicit").double()
    y = e64(x.double())
    assert rel_err(contract(e64)(x.double()), y) <= 1e-10
    assert rel_err(set_mode(e64, "fused")(x.double()), y) <= 1e-10
    e32 = set_mode(expanded, "explicit").float()
    y32 = e32(x.float())
    tol = dict(rtol=1e-5, atol=1e-5 * y32.abs().max().item())
    torch.testing.assert_close(contract(e32)(x.float()), y32, **tol)
    torch.testing.assert_close(set_mode(e32, "fused")(x.float()), y32, **tol)


class TinyNet(nn.Module):
    """Image conv -> BN -> ReLU -> the conv under test -> BN -> pool -> Linear -> ReLU -> Linear (classifier)."""

    def __init__(self, kernel: int, stride: int, groups: int | str, bias: bool, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=bias)
        self.bn0 = nn.BatchNorm2d(width)
        out = width if groups == "dw" else 2 * width
        g = width if groups == "dw" else groups
        conv = nn.Conv2d(width, out, kernel, stride=stride, padding=kernel // 2, groups=g, bias=bias)
        self.body = nn.Sequential(conv, nn.BatchNorm2d(out))
        self.fc1 = nn.Linear(out, 6, bias=bias)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(F.relu(self.bn0(self.stem(x))))
        return self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1))))


LAYER_CASES = list(itertools.product(["cl", "ck+fc"], [3, 5, 7], [1, 2], [1, 2, "dw"], [False, True]))


@pytest.mark.parametrize("rate", [0.5, 1, 4])
@pytest.mark.parametrize("strategy,kernel,stride,groups,bias", LAYER_CASES)
def test_layer_contraction_is_exact(strategy, kernel, stride, groups, bias, rate):
    torch.manual_seed(3)
    net = TinyNet(kernel, stride, groups, bias)
    e = expand(net, strategy, rate=rate)
    body = e.body[0]
    if strategy == "ck+fc" and kernel == 3:
        assert type(body) is nn.Conv2d  # ck leaves 3x3 kernels as they are
    else:
        assert isinstance(body, ExpandedConv2d)
        assert all(layer.groups == net.body[0].groups for layer in body.chain)
        assert all((layer.bias is not None) == bias for layer in body.chain)
        # the layer's own output map, borders included (the net's pooled logits could average errors away)
        layer = set_mode(body, "explicit").double()
        xb = torch.randn(2, layer.config.in_channels, 13, 11, dtype=torch.float64)
        assert rel_err(layer.to_compact()(xb), layer(xb)) <= 1e-10
    check_exact(e, torch.randn(2, 3, 13, 11))


def test_padding_every_chain_layer_breaks_exactness():
    """Negative control: the rule the upstream users broke (pad each 3x3) gives border errors we must see."""
    torch.manual_seed(13)
    layer = set_mode(expand(nn.Sequential(nn.Conv2d(3, 4, 7, padding=3)), "ck", rate=2)[0], "explicit").double()
    xb = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    compact = layer.to_compact()
    assert rel_err(compact(xb), layer(xb)) <= 1e-10
    for conv in layer.chain:
        conv.padding = (1, 1)
    assert rel_err(compact(xb), layer(xb)) > 1e-3


def test_chain_shapes_follow_the_paper():
    net = TinyNet(7, 2, 1, True)
    cl = expand(net, "cl", rate=4)
    assert [c.out_channels for c in cl.stem.chain] == [3, 16, 4]  # image layer keeps its 3 channels
    body = cl.body[0].chain
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in body] == [
        (4, 16, (1, 1), (1, 1), (3, 3)), (16, 32, (7, 7), (2, 2), (0, 0)), (32, 8, (1, 1), (1, 1), (0, 0))]
    ck = expand(net, "ck+fc", rate=4).body[0].chain
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in ck] == [
        (4, 16, (3, 3), (1, 1), (3, 3)), (16, 32, (3, 3), (1, 1), (0, 0)), (32, 8, (3, 3), (2, 2), (0, 0))]
    fc = expand(net, "fc", rate=0.5)
    assert isinstance(fc.fc1, ExpandedLinear) and type(fc.fc2) is nn.Linear  # classifier stays
    assert [c.out_features for c in fc.fc1.chain] == [4, 3, 6]
    dw = expand(TinyNet(3, 1, "dw", False), "cl", rate=0.5).body[0].chain  # at least one channel per group
    assert [c.out_channels for c in dw] == [4, 4, 4]


# SmallNet-7 with ExpandNet-CK: paper Table 9, #params (K) on CIFAR-10 / CIFAR-100 per rate.
TABLE9 = {0.25: (37.91, 43.76), 0.5: (42.81, 48.66), 0.75: (48.43, 54.28), 1.0: (54.77, 60.62),
          2.0: (87.32, 93.17), 4.0: (187.0, 192.8)}


@pytest.mark.parametrize("rate", sorted(TABLE9))
def test_smallnet7_ck_parameter_counts_match_table9(rate):
    for classes, expected in zip((10, 100), TABLE9[rate], strict=True):
        n = models.count_params(expand(models.build("smallnet7", num_classes=classes), "ck", rate=rate))
        decimals = 1 if expected >= 100 else 2
        assert round(n / 1000, decimals) == expected, (rate, classes, n)


def test_smallnet_odd_input_size_all_strategies():
    torch.manual_seed(4)
    for strategy in ("cl", "ck", "fc", "cl+fc", "ck+fc"):
        check_exact(expand(SmallNet(kernel=7, input_size=31), strategy, rate=2), torch.randn(2, 3, 31, 31))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("strategy", ["cl+fc", "ck+fc"])
def test_fused_and_explicit_gradients_are_identical(strategy, train):
    """Per factor, rtol 1e-4. In train mode BN cancels the gradient of a bias before it (true value 0), so
    those are compared against the model's largest gradient instead of their own (rounding-noise) scale."""
    torch.manual_seed(5)
    fused = randomize_bn(expand(models.build("smallnet7"), strategy, rate=2)).train(train)
    explicit = set_mode(fused, "explicit")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    grads = []
    for m in (fused, explicit):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    top = max(g.abs().max().item() for g in grads[1].values())
    for name in grads[0]:
        g_f, g_e = grads[0][name], grads[1][name]
        scale = top if (train and name.startswith("stages.") and name.endswith("bias")) else g_e.abs().max().item()
        torch.testing.assert_close(g_f, g_e, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_grouped_gradients_are_identical():
    torch.manual_seed(6)
    fused = expand(TinyNet(5, 2, "dw", True), "ck+fc", rate=4).double().train()
    explicit = set_mode(fused, "explicit")
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    for m in (fused, explicit):
        m(x).square().sum().backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), explicit.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-10, msg=n)


def test_contract_gives_the_compact_architecture_and_keeps_inputs():
    net = models.build("smallnet7")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    e = expand(net, "ck+fc", rate=4)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # input untouched
    assert not expanded_layers(net) and len(expanded_layers(e)) == 4
    assert e.compactfl_spec == net.compactfl_spec
    c = contract(e)
    ref = models.build("smallnet7")
    assert {k: v.shape for k, v in c.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert all(v.dtype == ref.state_dict()[k].dtype for k, v in c.state_dict().items())
    ref.load_state_dict(c.state_dict())
    assert models.model_spec(c) == models.model_spec(net)
    assert all(p.grad_fn is None and p.requires_grad for p in c.parameters())


def test_contract_does_not_touch_the_global_rng():
    e = expand(models.build("smallnet7"), "ck+fc", rate=1)
    torch.manual_seed(12)
    contract(e)
    after = torch.rand(3)
    torch.manual_seed(12)
    torch.testing.assert_close(after, torch.rand(3))


def test_contract_of_a_plain_model_is_an_equal_copy():
    net = models.build("resnet20")
    c = contract(net)
    assert c is not net
    assert c.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in c.state_dict().items())


def test_state_dict_moves_between_modes_and_mode_errors():
    e = expand(models.build("smallnet3"), "cl+fc", rate=2)
    x = set_mode(e, "explicit")
    assert e.state_dict().keys() == x.state_dict().keys()
    assert "stages.0.0.chain.0.weight" in e.state_dict()
    assert all(layer.mode == "explicit" for _, layer in expanded_layers(x))
    assert all(layer.mode == "fused" for _, layer in expanded_layers(e))
    x.load_state_dict(e.state_dict())
    assert models.trainable_state(e).keys() == models.trainable_state(x).keys()
    with pytest.raises(ValueError, match="mode"):
        set_mode(e, "lazy")
    with pytest.raises(ValueError, match="mode"):
        expand(models.build("smallnet3"), "cl", mode="lazy")


class BadNet(nn.Module):
    def __init__(self, **conv_kw) -> None:
        super().__init__()
        self.ok = nn.Conv2d(3, 4, 5, padding=2)
        self.bad = nn.Conv2d(4, 4, **conv_kw)

    def forward(self, x):
        return self.bad(self.ok(x))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("strategy,conv_kw,reason", [
    ("ck", dict(kernel_size=4, padding=2), "even kernel"),
    ("ck", dict(kernel_size=(5, 3), padding=1), "non-square"),
    ("ck", dict(kernel_size=5, dilation=2), "dilation"),
    ("cl", dict(kernel_size=3, dilation=2), "dilation"),
    ("cl", dict(kernel_size=3, padding=1, padding_mode="reflect"), "padding_mode"),
    ("cl", dict(kernel_size=4, padding="same"), "even kernel"),
])
def test_unsupported_layers_raise_or_are_skipped(strategy, conv_kw, reason):
    net = BadNet(**conv_kw)
    with pytest.raises(ValueError, match=rf"'bad'.*{reason}"):
        expand(net, strategy)
    with pytest.warns(UserWarning, match=rf"'bad'.*{reason}"):
        e = expand(net, strategy, skip_unsupported=True)
    assert type(e.bad) is nn.Conv2d and isinstance(e.ok, ExpandedConv2d)
    x = torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(contract(e.eval())(x), e(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    net = models.build("smallnet3")
    with pytest.raises(ValueError, match="strategy"):
        expand(net, "cx")
    for rate in (0, -1, float("nan"), True, "4"):
        with pytest.raises(ValueError, match="rate"):
            expand(net, "cl", rate=rate)
    with pytest.raises(ValueError, match="expands no layer"):
        expand(net, "ck")  # SmallNet-3 has only 3x3 kernels
    with pytest.raises(ValueError, match="already"):
        expand(expand(net, "cl"), "cl")


def test_padding_same_and_valid_strings():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 5, padding="same"), nn.Conv2d(4, 4, 7, padding="valid"))
    e = expand(net, "ck", rate=2)
    assert e[0].to_compact().padding == "same" and e[1].to_compact().padding == "valid"
    check_exact(e, torch.randn(2, 3, 15, 13))


def test_shared_layer_stays_shared():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    e = expand(net, "cl", rate=2)
    assert e[0] is e[2] and isinstance(e[0], ExpandedConv2d)


def test_init_from_expanded_is_a_contracted_fresh_expansion():
    net = models.build("smallnet7")
    torch.manual_seed(8)
    a = init_from_expanded(net, "ck", rate=4)
    torch.manual_seed(8)
    b = contract(expand(net, "ck", rate=4))
    sd_a, sd_net = a.state_dict(), net.state_dict()
    assert sd_a.keys() == sd_net.keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sd_a.items())
    assert not torch.equal(sd_a["stages.0.0.weight"], sd_net["stages.0.0.weight"])  # expanded: new weights
    assert torch.equal(sd_a["classifier.1.weight"], sd_net["classifier.1.weight"])  # ck leaves the FC alone
    assert not any(isinstance(m, ExpandedConv2d) for m in a.modules())


def test_explicit_macs_count_the_chain_and_contracted_macs_equal_compact():
    net = nn.Sequential(nn.Conv2d(3, 8, 7, padding=3, bias=False))
    e = expand(net, "ck", rate=4)
    # chain 3 -> 3 -> 32 -> 8 of 3x3 convs: outputs 10x10, 8x8, 6x6 on a 6x6 input padded by 3
    expected = 3 * 3 * 9 * 10 * 10 + 3 * 32 * 9 * 8 * 8 + 32 * 8 * 9 * 6 * 6
    assert models.count_macs(set_mode(e, "explicit"), (1, 3, 6, 6)) == expected
    assert models.count_macs(contract(e), (1, 3, 6, 6)) == models.count_macs(net, (1, 3, 6, 6)) == 3 * 8 * 49 * 36


def test_expansion_summary_for_inspect():
    s = expansion_summary(models.build("smallnet7"), "ck", rate=4)
    assert s["compact"] == s["contracted"]
    assert s["compact"]["params"] == 66_186 and s["expanded"]["params"] == 186_982
    assert s["expanded"]["macs"] > 2 * s["compact"]["macs"]


def test_finalize_contracts_expanded_layers():
    torch.manual_seed(9)
    e = randomize_bn(expand(models.build("smallnet7"), "cl+fc", rate=1)).eval()
    f = models.finalize(e)
    x = torch.randn(2, 3, 32, 32)
    assert not models.has_reparameterized(f)
    y = e(x)
    torch.testing.assert_close(f(x), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_expanded_layers_convert_dtype_and_keep_training_flag():
    e = expand(models.build("smallnet3"), "cl", rate=1).double()
    e.eval()
    layer = e.stages[0][0]
    compact = layer.to_compact()
    assert compact.weight.dtype == torch.float64 and not compact.training
    assert not compact.weight.requires_grad or compact.weight.grad_fn is None


def test_fused_composition_ignores_autocast():
    e = expand(models.build("smallnet7"), "ck", rate=2)
    layer = e.stages[2][0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, _ = layer.composed()
        y = e(torch.randn(2, 3, 32, 32))
    assert w.dtype == torch.float32 and y.shape == (2, 10)


def test_expand_is_deterministic_under_a_seed():
    net = models.build("smallnet7")
    torch.manual_seed(10)
    a = expand(net, "ck", rate=2)
    torch.manual_seed(10)
    b = expand(net, "ck", rate=2)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expand(net, "cl", rate=0.3)  # rates below 1 shrink without complaint


# ------------------------------------------------------------------ every registered architecture
# resnet56 (0.85M params, 56 layers) only repeats resnet20's layers and is slow in float64 on a 2-core box;
# larger registered nets are skipped by size for the same reason (their layer types are covered here).
SKIP = {"resnet56"}
MAX_PARAMS = 3_000_000


# Small members of the pattern families (tried when the family is registered), cheap blocks included.
FAMILY_INSTANCES = [("wrn-10-1", {}), ("wrn-10-2", {"block": "G(2)"}), ("densenet-bc-10-4", {})]


def _registered() -> list:
    cases = []
    for name, kwargs in [(n, {}) for n in models.list_models()] + FAMILY_INSTANCES:
        if name in SKIP:
            continue
        try:
            net = models.build(name, **kwargs)
        except (ValueError, TypeError):  # a family pattern such as "wrn-D-K", or a family not registered yet
            continue
        if models.count_params(net) <= MAX_PARAMS:
            tag = "".join(f"-{k}={v}" for k, v in kwargs.items())
            cases.append(pytest.param(name, kwargs, id=name + tag))
    return cases


def _input(net: torch.nn.Module) -> torch.Tensor:
    """An odd-sized input when the architecture accepts one (SmallNet's FC fixes 32x32)."""
    x = torch.randn(2, 3, 33, 33)
    try:
        with torch.no_grad():
            net.eval()(x)
        return x
    except RuntimeError:
        return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name,kwargs", _registered())
def test_every_strategy_contracts_exactly(name, kwargs):
    torch.manual_seed(11)
    net = models.build(name, **kwargs)
    x = _input(net)
    ref_shapes = {k: v.shape for k, v in net.state_dict().items()}
    seen: set[frozenset[str]] = set()
    for strategy in STRATEGIES:
        try:
            e = expand(net, strategy, rate=2)
        except ValueError as exc:
            assert "expands no layer" in str(exc)
            continue
        paths = frozenset(p for p, _ in expanded_layers(e))
        if paths in seen:  # e.g. "cl+fc" on a net whose only Linear is the classifier: same as "cl"
            continue
        seen.add(paths)
        check_exact(e, x)
        assert {k: v.shape for k, v in contract(e).state_dict().items()} == ref_shapes
    assert seen, f"no strategy applies to {name}"
