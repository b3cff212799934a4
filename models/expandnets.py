"""ExpandNets (Guo, Alvarez, Salzmann, NeurIPS 2020): train a compact CNN linearly expanded, deploy it contracted.

``expand(model, strategy, rate, mode)`` replaces layers by chains of linear layers (no nonlinearity between):

- ``cl``: every conv with a kernel larger than 1x1 -> 1x1 (m -> p = r*m), kxk (p -> q = r*n, original stride),
  1x1 (q -> n). 1x1 convs are left as they are (expanding them is the FC case, which the paper does not do).
- ``ck``: every conv with an odd square kernel k > 3 -> (k-1)/2 chained 3x3 convs with channels
  m -> r*m -> r*n ... r*n -> n, the original stride on the last one. 1x1 and 3x3 convs are left as they are;
  even or non-square kernels are unsupported.
- ``fc``: every ``nn.Linear`` except the classifier (the last Linear in module order) -> m -> r*m -> r*n -> n.
- ``cl+fc`` / ``ck+fc``: both.

Exactness rules (paper Sec. 3.2): the original padding goes on the chain's first layer only, the stride on
the kxk layer (CL) or the last 3x3 (CK); grouped/depthwise convs expand inside each group; every chain layer
has a bias iff the original layer had one; BatchNorm stays after the whole chain. The first conv of the
network (the one reading the image) keeps the image's channel count in its first chain layer, as in the
paper's SmallNet (this rule reproduces Table 9's parameter counts at every rate). Only exact ``nn.Conv2d`` and
``nn.Linear`` modules are candidates; subclasses (custom forward) are left alone.

Chain layers get PyTorch's default initialisation. ``contract`` turns every expanded layer back into the
original layer (float64 maths), so the result has the state-dict keys and shapes of ``models.build(name)``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

from torch import nn

from models.counting import count_macs, count_params
from models.expand_layers import (
    MODES,
    ConvConfig,
    ExpandedConv2d,
    ExpandedLinear,
    check_mode,
    is_expanded,
    scaled_width,
)
from models.finalize import is_reparameterized, replace_reparameterized
from models.state import unwrap

STRATEGIES = ("cl", "ck", "fc", "cl+fc", "ck+fc")

__all__ = ["STRATEGIES", "MODES", "expand", "contract", "init_from_expanded", "set_mode", "is_expanded",
           "expanded_layers", "expansion_summary"]


class _Unsupported(Exception):
    """A candidate layer the strategy cannot expand exactly (the message says why)."""


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"expansion rate must be a positive finite number, got {rate!r}")
    return float(rate)


def _conv_common_checks(conv: nn.Conv2d) -> None:
    if tuple(conv.dilation) != (1, 1):
        raise _Unsupported(f"dilation {tuple(conv.dilation)} (only 1 contracts exactly)")
    if conv.padding_mode != "zeros":
        raise _Unsupported(f"padding_mode {conv.padding_mode!r} (only 'zeros' contracts exactly)")
    if conv.padding == "same" and any(k % 2 == 0 for k in conv.kernel_size):
        raise _Unsupported("padding 'same' with an even kernel (asymmetric padding)")


def _expand_cl(conv: nn.Conv2d, rate: float, mode: str, keep_input: bool) -> ExpandedConv2d | None:
    if tuple(conv.kernel_size) == (1, 1):
        return None
    _conv_common_checks(conv)
    g = conv.groups
    p = conv.in_channels if keep_input else scaled_width(conv.in_channels, g, rate)
    q = scaled_width(conv.out_channels, g, rate)
    return ExpandedConv2d(ConvConfig.of(conv), [conv.in_channels, p, q, conv.out_channels],
                          [(1, 1), tuple(conv.kernel_size), (1, 1)], stride_at=1, mode=mode,
                          device=conv.weight.device, dtype=conv.weight.dtype)


def _expand_ck(conv: nn.Conv2d, rate: float, mode: str, keep_input: bool) -> ExpandedConv2d | None:
    kh, kw = conv.kernel_size
    if (kh, kw) in ((1, 1), (3, 3)):
        return None
    if kh != kw:
        raise _Unsupported(f"non-square kernel {kh}x{kw} (ck chains 3x3 convs)")
    if kh % 2 == 0:
        raise _Unsupported(f"even kernel {kh}x{kw} (ck needs an odd kernel > 3)")
    _conv_common_checks(conv)
    g, n_layers = conv.groups, (kh - 1) // 2
    p1 = conv.in_channels if keep_input else scaled_width(conv.in_channels, g, rate)
    widths = [conv.in_channels, p1] + [scaled_width(conv.out_channels, g, rate)] * (n_layers - 2)
    widths.append(conv.out_channels)
    return ExpandedConv2d(ConvConfig.of(conv), widths, [(3, 3)] * n_layers, stride_at=n_layers - 1, mode=mode,
                          device=conv.weight.device, dtype=conv.weight.dtype)


def _expand_fc(linear: nn.Linear, rate: float, mode: str) -> ExpandedLinear:
    m, n = linear.in_features, linear.out_features
    widths = [m, scaled_width(m, 1, rate), scaled_width(n, 1, rate), n]
    return ExpandedLinear(widths, linear.bias is not None, mode=mode, device=linear.weight.device,
                          dtype=linear.weight.dtype)


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        k = "x".join(str(v) for v in module.kernel_size)
        return f"Conv2d {module.in_channels}->{module.out_channels} kernel {k}"
    return type(module).__name__


def _plan(model: nn.Module, strategy: str, rate: float, mode: str,
          skip_unsupported: bool) -> dict[int, tuple[nn.Module, nn.Module]]:
    """id(original layer) -> (original, expanded replacement) for every layer the strategy expands."""
    conv_strategy = strategy.split("+")[0] if strategy.split("+")[0] in ("cl", "ck") else None
    with_fc = strategy.endswith("fc")
    named = list(model.named_modules())
    convs = [(n, m) for n, m in named if type(m) is nn.Conv2d]
    linears = [(n, m) for n, m in named if type(m) is nn.Linear]
    image_conv = convs[0][1] if convs else None
    candidates: list[tuple[str, nn.Module, Callable[[], nn.Module | None]]] = []
    if conv_strategy is not None:
        fn = _expand_cl if conv_strategy == "cl" else _expand_ck
        for name, conv in convs:
            candidates.append((name, conv, lambda c=conv, f=fn: f(c, rate, mode, c is image_conv)))
    if with_fc:
        for name, lin in linears[:-1]:  # the classifier (last Linear) stays as it is
            candidates.append((name, lin, lambda m=lin: _expand_fc(m, rate, mode)))
    plan: dict[int, tuple[nn.Module, nn.Module]] = {}
    for name, module, make in candidates:
        try:
            new = make()
        except _Unsupported as exc:
            msg = f"cannot expand layer {name!r} ({_describe(module)}) with {strategy!r}: {exc}"
            if not skip_unsupported:
                raise ValueError(msg + "; pass skip_unsupported=True to leave it unexpanded") from None
            warnings.warn(msg + "; left unexpanded", stacklevel=3)
            continue
        if new is not None:
            new.train(module.training)
            plan[id(module)] = (module, new)
    return plan


def expand(model: nn.Module, strategy: str, rate: float = 4, mode: str = "fused",
           skip_unsupported: bool = False) -> nn.Module:
    """A new, linearly expanded copy of ``model`` (input untouched); ``strategy`` in cl | ck | fc | cl+fc | ck+fc.

    ``rate`` is any positive number (< 1 shrinks; widths rounded half-up, at least one per group). ``mode``
    ``"fused"`` trains at the compact net's activation cost, ``"explicit"`` runs the chains layer by layer.
    Raises ValueError naming the layer when one cannot be expanded exactly (unless ``skip_unsupported``, which
    warns and leaves it), and when the strategy finds nothing to expand in the model.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"expansion strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    rate = _check_rate(rate)
    check_mode(mode)
    src = unwrap(model)
    if any(is_reparameterized(m) for m in src.modules()):
        raise ValueError(f"{type(src).__name__} already holds expanded or generated layers; expand the compact model")
    out = copy.deepcopy(src)
    plan = _plan(out, strategy, rate, mode, skip_unsupported)
    if not plan:
        what = {"cl": "convs larger than 1x1", "ck": "odd square kernels > 3", "fc": "Linear layers besides the "
                "classifier"}
        needs = " or ".join(what[s] for s in strategy.split("+"))
        raise ValueError(f"strategy {strategy!r} expands no layer of {type(src).__name__} (it needs {needs})")
    slots = [(parent, attr) for parent in out.modules() for attr, child in parent._modules.items()
             if child is not None and id(child) in plan]
    for parent, attr in slots:  # every reference, so a layer shared by two parents stays shared
        parent._modules[attr] = plan[id(parent._modules[attr])][1]
    return out


def expanded_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, layer)`` for every expanded layer of ``model``."""
    return [(n, m) for n, m in unwrap(model).named_modules() if is_expanded(m)]


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """A copy of ``model`` whose expanded layers run in ``mode`` (e.g. ``"explicit"`` to count train-time MACs)."""
    check_mode(mode)
    out = copy.deepcopy(unwrap(model))
    for _, layer in expanded_layers(out):
        layer.set_mode(mode)
    return out


def contract(expanded: nn.Module) -> nn.Module:
    """The compact model: a copy in which every expanded layer is replaced by its contracted original layer.

    Exact up to rounding (float64 maths, cast back). A model without expanded layers comes back as an equal
    copy; other re-parameterised layers (CSG) are left to :func:`models.finalize`.
    """
    return replace_reparameterized(expanded, predicate=is_expanded)


def init_from_expanded(compact: nn.Module, strategy: str, rate: float = 4) -> nn.Module:
    """The compact net initialised with a freshly initialised, contracted ExpandNet (paper's Hypothesis 1).

    Layers the strategy does not expand keep ``compact``'s weights; the chains draw from torch's global RNG.
    """
    return contract(expand(compact, strategy, rate=rate))


def expansion_summary(compact: nn.Module, strategy: str, rate: float = 4,
                      input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, dict[str, int]]:
    """Parameters and MACs of the compact, expanded (train time) and contracted (deployed) nets.

    Expanded MACs are those of the explicit chain (the paper's train-time count); a fused layer really
    spends the compact layer's MACs on activations plus a per-batch weight composition.
    """
    expanded = expand(compact, strategy, rate=rate, mode="explicit")
    nets = {"compact": compact, "expanded": expanded, "contracted": contract(expanded)}
    return {k: {"params": count_params(m), "macs": count_macs(m, input_shape)} for k, m in nets.items()}
