"""ExpandNets layers: a chain of linear layers standing in for one ``nn.Conv2d`` / ``nn.Linear``.

Each expanded layer keeps its chain in ``self.chain`` (plain ``nn.Conv2d``/``nn.Linear`` modules, so the
state-dict names are ``<path>.chain.<i>.weight|bias`` in both modes) and runs in one of two modes:

- ``"fused"``: contract the chain's weights on the fly (differentiable, in the parameters' dtype) and run ONE
  convolution with the original padding/stride/groups. Activation memory and compute are those of the
  compact layer; the function, hence every gradient, equals the explicit chain's.
- ``"explicit"``: run the chain layer by layer (verification, ablation, and counting train-time MACs).

``to_compact()`` (the repo-wide finalisation protocol, see ``models/finalize.py``) returns the original
plain layer with contracted weights, computed in float64 and cast back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from models.expand_algebra import chain_plan, compose_chain

MODES = ("fused", "explicit")


def scaled_width(channels: int, groups: int, rate: float) -> int:
    """``rate`` times ``channels`` rounded half-up per group, at least one channel per group."""
    per_group = channels // groups
    return groups * max(1, math.floor(rate * per_group + 0.5))


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"expansion mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class ConvConfig:
    """The hyper-parameters of the original ``nn.Conv2d`` (what ``to_compact`` rebuilds)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    groups: int
    bias: bool

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvConfig:
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   conv.padding if isinstance(conv.padding, str) else tuple(conv.padding), conv.groups,
                   conv.bias is not None)

    def numeric_padding(self) -> tuple[int, int]:
        """Padding as numbers ('valid' -> 0, 'same' -> k // 2 for odd kernels) for the chain's first layer."""
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            return (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        return self.padding


class _Expanded(nn.Module):
    """Shared machinery: the chain, the mode switch, composition and the finalisation protocol."""

    chain: nn.ModuleList

    def __init__(self, layers: list[nn.Module], mode: str, groups: int) -> None:
        super().__init__()
        self.chain = nn.ModuleList(layers)
        self.mode = check_mode(mode)
        self._groups = groups
        self._plan = chain_plan([layer.weight.shape for layer in layers], groups)  # shapes are fixed

    def set_mode(self, mode: str) -> None:
        """Switch between ``"fused"`` and ``"explicit"``; parameters are shared, nothing is recomputed."""
        self.mode = check_mode(mode)

    def composed(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The contracted ``(weight, bias)`` of the chain, differentiable; ``dtype`` casts the factors first.

        Autocast is off here: the factors compose in their own dtype even inside a mixed-precision forward.
        """
        ws = [layer.weight if dtype is None else layer.weight.to(dtype) for layer in self.chain]
        bs = [layer.bias if (dtype is None or layer.bias is None) else layer.bias.to(dtype) for layer in self.chain]
        with torch.autocast(ws[0].device.type, enabled=False):
            return compose_chain(ws, bs, self._groups, self._plan)

    def _contracted(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contraction for deployment: float64 maths, cast back to the parameters' dtype, detached."""
        dtype = self.chain[0].weight.dtype
        with torch.no_grad():
            w, b = self.composed(torch.float64)
        return w.to(dtype), (None if b is None else b.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.mode == "explicit":
            for layer in self.chain:
                x = layer(x)
            return x
        w, b = self.composed()
        return self._run_compact(x, w, b)

    def _run_compact(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The compact layer's operation with weight ``w`` and bias ``b``."""
        raise NotImplementedError

    def _compact_layer(self) -> nn.Module:
        raise NotImplementedError

    def to_compact(self) -> nn.Module:
        """The original plain layer with the contracted weights (same dtype/device, detached; no RNG draws)."""
        w, b = self._contracted()
        layer = self._compact_layer()
        with torch.no_grad():
            layer.weight.copy_(w)
            if layer.bias is not None:
                layer.bias.copy_(b if b is not None else torch.zeros_like(layer.bias))
        return layer.train(self.training)


class ExpandedConv2d(_Expanded):
    """A ``nn.Conv2d`` trained as a chain of convolutions (CL: 1x1, kxk, 1x1; CK: 3x3 ... 3x3).

    ``widths`` are the chain's channel counts (first = in, last = out), ``kernels`` one kernel per chain layer;
    the chain's first layer carries the original padding and layer ``stride_at`` the original stride. All
    layers share the original ``groups`` (grouped/depthwise layers expand inside each group) and have a bias
    iff the original had one.
    """

    def __init__(self, config: ConvConfig, widths: list[int], kernels: list[tuple[int, int]], stride_at: int,
                 mode: str = "fused", device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        if len(widths) != len(kernels) + 1 or widths[0] != config.in_channels or widths[-1] != config.out_channels:
            raise ValueError(f"chain widths {widths} do not fit a conv {config.in_channels}->{config.out_channels}")
        layers = [
            nn.Conv2d(cin, cout, k, stride=config.stride if i == stride_at else 1,
                      padding=config.numeric_padding() if i == 0 else 0, groups=config.groups,
                      bias=config.bias, device=device, dtype=dtype)
            for i, (cin, cout, k) in enumerate(zip(widths[:-1], widths[1:], kernels, strict=True))
        ]
        super().__init__(layers, mode, config.groups)
        self.config = config

    def _run_compact(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        return F.conv2d(x, w, b, c.stride, c.padding, 1, c.groups)

    def _compact_layer(self) -> nn.Conv2d:
        c, ref = self.config, self.chain[0].weight
        return skip_init(nn.Conv2d, c.in_channels, c.out_channels, c.kernel_size, stride=c.stride,
                         padding=c.padding, groups=c.groups, bias=c.bias, device=ref.device, dtype=ref.dtype)

    def extra_repr(self) -> str:
        c = self.config
        widths = [self.chain[0].in_channels] + [layer.out_channels for layer in self.chain]
        kernels = ",".join(f"{layer.kernel_size[0]}x{layer.kernel_size[1]}" for layer in self.chain)
        return (f"{c.in_channels}->{c.out_channels}, kernel={c.kernel_size}, stride={c.stride}, "
                f"padding={c.padding}, groups={c.groups}, bias={c.bias}, chain={widths} [{kernels}], mode={self.mode}")


class ExpandedLinear(_Expanded):
    """A ``nn.Linear`` trained as a chain of linear layers ``m -> r*m -> r*n -> n`` (bias iff the original's)."""

    def __init__(self, widths: list[int], bias: bool, mode: str = "fused", device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        layers = [nn.Linear(cin, cout, bias=bias, device=device, dtype=dtype)
                  for cin, cout in zip(widths[:-1], widths[1:], strict=True)]
        super().__init__(layers, mode, 1)
        self.in_features, self.out_features, self.has_bias = widths[0], widths[-1], bias

    def _run_compact(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def _compact_layer(self) -> nn.Linear:
        ref = self.chain[0].weight
        return skip_init(nn.Linear, self.in_features, self.out_features, bias=self.has_bias, device=ref.device,
                         dtype=ref.dtype)

    def extra_repr(self) -> str:
        widths = [self.in_features] + [layer.out_features for layer in self.chain]
        return f"chain={widths}, bias={self.has_bias}, mode={self.mode}"


def is_expanded(module: nn.Module) -> bool:
    """True for ExpandNets layers (the ones :func:`models.contract` contracts)."""
    return isinstance(module, _Expanded)
