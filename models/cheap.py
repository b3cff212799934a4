"""Moonshine cheap convolution blocks (Crowley et al. 2018, Table 1), their SPEC parser and ``cheapen``.

A block SPEC names what replaces the convolutions of a pre-activation residual block:

- ``S``: standard, two kxk convolutions (k = 3); ``S-2x2``: 2x2 kernels with dilation 2.
- ``G(g)``: each 3x3 conv becomes a grouped 3x3 (g groups, channels unchanged) + BN-ReLU + 1x1; a change of
  width happens across the 1x1.
- ``B(b)``: the block body becomes one bottleneck: 1x1 (N -> M = N/b), BN-ReLU, 3x3 (M -> M), BN-ReLU,
  1x1 (M -> N).
- ``BG(b,g)``: as ``B`` with a grouped 3x3.

``g`` is a number or ``N/x``, ``N``, ``M/x``, ``M``: N is the channel count of the grouped conv in a ``G``
block (the conv's input width, as the counts of Moonshine's Tables 3/4 require for the first block of a
group), M the bottleneck width N/b of a ``BG`` block (``N`` in a ``BG`` block means its width).
Every block keeps pre-activation BN-ReLU ordering; the block's own first BN-ReLU, the stem, 1x1 shortcuts
and the classifier are not part of the body and are never replaced.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

from torch import nn

from models.registry import SPEC_ATTR
from models.state import unwrap

_NUM = r"[1-9]\d*"
_GROUPS = rf"(?:{_NUM}|[NM](?:/{_NUM})?)"
_SPEC_RE = re.compile(rf"^(?:(S)|(S-2X2)|G\(({_GROUPS})\)|B\(({_NUM})\)|BG\(({_NUM}),({_GROUPS})\))$")


@dataclass(frozen=True)
class BlockSpec:
    """A parsed block SPEC: ``kind`` in S, S-2x2, G, B, BG; ``bottleneck`` b; ``groups`` as written."""

    kind: str
    bottleneck: int = 1
    groups: str | None = None

    def __str__(self) -> str:
        if self.kind in ("S", "S-2x2"):
            return self.kind
        if self.kind == "G":
            return f"G({self.groups})"
        if self.kind == "B":
            return f"B({self.bottleneck})"
        return f"BG({self.bottleneck},{self.groups})"

    def resolve_groups(self, channels: int, width: int, where: str = "block") -> int:
        """Number of groups for a grouped conv over ``channels`` inside a block of width ``width``."""
        text = self.groups or "1"
        if text[0] in "NM":
            base = channels if (text[0] == "M" or self.kind == "G") else width
            div = int(text.split("/")[1]) if "/" in text else 1
            if base % div:
                raise ValueError(f"block {self}: {text} needs {base} divisible by {div} ({where})")
            g = base // div
        else:
            g = int(text)
        if g < 1 or channels % g:
            raise ValueError(f"block {self}: {g} groups do not divide {channels} channels ({where})")
        return g


def parse_block(spec: str | BlockSpec) -> BlockSpec:
    """Parse a block SPEC such as ``S``, ``S-2x2``, ``G(4)``, ``G(N/8)``, ``B(2)``, ``BG(2,M/4)``."""
    if isinstance(spec, BlockSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"block spec must be a string like 'G(4)', got {type(spec).__name__}")
    text = re.sub(r"\s+", "", spec).upper()
    m = _SPEC_RE.match(text)
    if m is None:
        raise ValueError(
            f"invalid block spec {spec!r}: expected S, S-2x2, G(g), B(b) or BG(b,g) "
            "with g a number, N, N/x, M or M/x"
        )
    s, s2, g, b, bg_b, bg_g = m.groups()
    if s:
        return BlockSpec("S")
    if s2:
        return BlockSpec("S-2x2")
    if g is not None:
        if g.startswith("M"):
            raise ValueError(f"invalid block spec {spec!r}: M (bottleneck width) is only defined for BG blocks")
        return BlockSpec("G", groups=g)
    if b is not None:
        return BlockSpec("B", bottleneck=int(b))
    return BlockSpec("BG", bottleneck=int(bg_b), groups=bg_g)


# ------------------------------------------------------------------------------------------- modules
def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class GroupedPointwise(nn.Sequential):
    """G(g) unit replacing one kxk conv: grouped kxk (channels kept) -> BN-ReLU -> 1x1 to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.gconv = nn.Conv2d(in_ch, in_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
        self.act = _bn_relu(in_ch)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)


class ConvPair(nn.Sequential):
    """Body of S / S-2x2 / G blocks: conv-unit (in -> out, stride), BN-ReLU, conv-unit (out -> out)."""

    def __init__(self, conv1: nn.Module, out_ch: int, conv2: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv1
        self.act = _bn_relu(out_ch)
        self.conv2 = conv2


class Bottleneck(nn.Sequential):
    """Body of B / BG blocks: 1x1 (in -> mid), BN-ReLU, 3x3 (mid -> mid, stride, groups), BN-ReLU, 1x1 (-> out)."""

    def __init__(self, in_ch: int, mid: int, out_ch: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.down = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.act1 = _bn_relu(mid)
        self.conv = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.act2 = _bn_relu(mid)
        self.up = nn.Conv2d(mid, out_ch, 1, bias=False)


def _kxk(in_ch: int, out_ch: int, stride: int, two_by_two: bool) -> nn.Conv2d:
    if two_by_two:  # 2x2 kernel, dilation 2: same receptive field and output size as a padded 3x3
        return nn.Conv2d(in_ch, out_ch, 2, stride=stride, padding=1, dilation=2, bias=False)
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def make_body(block: str | BlockSpec, in_ch: int, out_ch: int, stride: int = 1, where: str = "block") -> nn.Module:
    """The residual body (everything after the block's pre-activation) for ``block``, Moonshine-initialised."""
    spec = parse_block(block)
    if spec.kind in ("S", "S-2x2"):
        two = spec.kind == "S-2x2"
        body: nn.Module = ConvPair(_kxk(in_ch, out_ch, stride, two), out_ch, _kxk(out_ch, out_ch, 1, two))
    elif spec.kind == "G":
        g1 = spec.resolve_groups(in_ch, out_ch, f"{where}, first conv")
        g2 = spec.resolve_groups(out_ch, out_ch, f"{where}, second conv")
        body = ConvPair(GroupedPointwise(in_ch, out_ch, g1, stride), out_ch, GroupedPointwise(out_ch, out_ch, g2))
    else:
        if out_ch % spec.bottleneck:
            raise ValueError(f"block {spec}: bottleneck {spec.bottleneck} does not divide width {out_ch} ({where})")
        mid = out_ch // spec.bottleneck
        groups = spec.resolve_groups(mid, out_ch, where) if spec.kind == "BG" else 1
        body = Bottleneck(in_ch, mid, out_ch, stride, groups)
    moonshine_init_(body)
    return body


def moonshine_init_(module: nn.Module) -> nn.Module:
    """Moonshine's init: conv ~ N(0, sqrt(2 / (k*k*out_channels))), BN weight 1 / bias 0, Linear bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return module


# ------------------------------------------------------------------------------------------- cheapen
def cheapen(model: nn.Module, block: str | BlockSpec = "G(4)") -> nn.Module:
    """A copy of ``model`` whose every residual block body is replaced by ``block`` (stem, shortcuts, FC kept).

    Blocks opt in by defining ``rebuild_body(spec, where)`` (the Wide ResNet blocks do). The copy's
    ``compactfl_spec`` gets ``kwargs["block"]`` so ``models.build_from_spec`` rebuilds the cheap student.
    The input model is left untouched; kept layers keep their weights, new bodies are freshly initialised.
    """
    spec = parse_block(block)
    out = copy.deepcopy(unwrap(model))
    replaced = 0
    for name, m in out.named_modules():
        rebuild = getattr(m, "rebuild_body", None)
        if callable(rebuild):
            rebuild(spec, where=name or type(m).__name__)
            replaced += 1
    if replaced == 0:
        raise TypeError(
            f"cannot cheapen {type(model).__name__}: it has no standard blocks (supported families: wrn-D-K)"
        )
    old = getattr(out, SPEC_ATTR, None)
    if old is not None:
        setattr(out, SPEC_ATTR, {**old, "kwargs": {**dict(old.get("kwargs") or {}), "block": str(spec)}})
    return out
