"""Compact-space communication of federated ExpandNets (``transport.communicate: compact``): the wire layout.

Server and every node derive the same **wire layout** from the run config alone: the seeded initial
expansion (``pipeline.modeling.build_training_model``, the model a ``factors`` run starts from too, so both
modes start from the same function) is probed with :func:`models.lift` towards a seeded random compact
target. An expanded layer whose chain reaches it travels as the COMPACT layer's ``weight``/``bias``; one
that does not (e.g. SmallNet-7's 7x7 image conv under CK: its 3->3->32->8 chain reaches a rank-600 subspace
of the 1,176-dimensional kernels) is a **fallback** and travels as its factors. BatchNorm tensors and
non-expanded layers travel as they are. Everything downstream (aggregation, screening, codecs, error
feedback, the delta downlink, checkpoints) only sees a state dict in this layout.

- :meth:`CompactSpace.wire_state`: a trained chain -> its wire state (contract the compact layers);
- :meth:`CompactSpace.receive`: a received wire state -> the factors a node holds, in place (fallback factors
  and plain tensors loaded, compact layers lifted with the minimal-norm change of all their factors, finished
  exactly on one: ``models.lift(spread=True)``; chains balanced before and after: ``models.balance``),
  returning the LiftReport;
- :meth:`CompactSpace.materialize`: a wire state -> a fresh training-time model (the seeded expansion with the
  state received), what the server evaluates and deploys (``models.finalize`` contracts it).
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

import models
from models.expandnets import expanded_layers
from models.lift import LiftReport, lift
from pipeline.config import RunConfig, communicate_mode
from pipeline.modeling import build_training_model

log = logging.getLogger("compactfl.transport")
#: reply metric: the largest relative lift residual (kernel or bias) of the node's compact layers this round
LIFT_RESIDUAL_KEY = "lift-residual"
PROBE_SEED_OFFSET = 7_919  # the probe target's generator seed is ``cfg.seed + PROBE_SEED_OFFSET``


@dataclass(frozen=True)
class WireLayout:
    """Which expanded layers travel compact and which as factors (with the probe's residual)."""

    compact: tuple[str, ...]
    fallback: dict[str, float]


def _owner(key: str) -> str:
    """The module path of a state key (``stages.0.0.weight`` -> ``stages.0.0``)."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def probe_layout(expanded: nn.Module, seed: int) -> WireLayout:
    """Lift a copy of ``expanded`` towards a seeded random compact state: layers that reach it travel compact."""
    trial = copy.deepcopy(models.state.unwrap(expanded))
    generator = torch.Generator().manual_seed(int(seed) + PROBE_SEED_OFFSET)
    target = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64)
              for k, v in models.trainable_state(models.contract(trial)).items()}
    report = lift(trial, target)
    fallback = {x.path: x.residual for x in report.layers if x.fallback}
    return WireLayout(tuple(x.path for x in report.layers if not x.fallback), fallback)


class CompactSpace:
    """The wire layout of one run and the conversions between it and a node's factors (see the module doc)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.template = build_training_model(cfg).cpu()
        self.layout = probe_layout(self.template, cfg.seed)
        for path, residual in self.layout.fallback.items():
            log.info("transport.communicate compact: layer %s cannot reach every compact kernel (probe residual "
                     "%.3g): it travels as its factors", path, residual)
        self._factor_keys = {path: [k for k in models.trainable_state(self.template) if _owner(k).startswith(
            f"{path}.chain.")] for path in self.layout.fallback}
        self.keys = list(self.wire_state(self.template))

    def wire_state(self, expanded: nn.Module) -> dict[str, torch.Tensor]:
        """The state that travels for ``expanded``: contracted compact layers, fallback factors, the rest as is."""
        model = models.state.unwrap(expanded)
        compact = models.trainable_state(models.contract(model))
        own = models.trainable_state(model)
        out: dict[str, torch.Tensor] = {}
        for key, value in compact.items():
            path = _owner(key)
            if path in self.layout.fallback:
                out.update({k: own[k].detach().cpu().clone() for k in self._factor_keys[path]})
            else:
                out[key] = value.detach().cpu().clone()
        return out

    def receive(self, expanded: nn.Module, wire: dict[str, torch.Tensor], spread: bool = True) -> LiftReport:
        """Write ``wire`` into ``expanded``'s own factors in place: fallback factors are loaded, the rest lifted.

        ``spread`` moves every factor (``models.lift(spread=True)``), which is what a node that trains next
        wants; evaluation and deployment only need the contracted function, so :meth:`materialize` skips it.
        A ValueError names the first missing or unexpected key (nothing is modified then).
        """
        missing = [k for k in self.keys if k not in wire]
        extra = [k for k in wire if k not in set(self.keys)]
        if missing or extra:
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
            raise ValueError(f"compact-space state does not fit this run's wire layout: {what}")
        model = models.state.unwrap(expanded)
        own = models.trainable_state(model)
        with torch.no_grad():
            for path in self.layout.fallback:
                for key in self._factor_keys[path]:
                    own[key].copy_(torch.as_tensor(wire[key]).to(device=own[key].device, dtype=own[key].dtype))
        factors = {k for keys in self._factor_keys.values() for k in keys}
        target = {k: v for k, v in wire.items() if k not in factors}
        for path, layer in expanded_layers(model):
            if path in self.layout.fallback:  # its own contraction, exactly: lift leaves the loaded factors as they are
                w, b = layer.composed(torch.float64)
                prefix = f"{path}." if path else ""
                target[prefix + "weight"] = w.detach()
                if b is not None:
                    target[prefix + "bias"] = b.detach()
        fallback = tuple(self.layout.fallback)
        models.balance(model, skip=fallback)  # a well-conditioned map for the correction ...
        report = lift(model, target, spread=spread)  # every factor moves, as factor averaging would move them
        models.balance(model, skip=fallback)  # ... and no factor left to grow round after round (models.lift)
        return report

    def holding(self, factors: dict[str, torch.Tensor]) -> nn.Module:
        """A fresh training-time model holding ``factors`` (its full ``models.trainable_state``)."""
        model = copy.deepcopy(self.template)
        models.load_trainable_state(model, factors)
        return model

    def materialize(self, wire: dict[str, torch.Tensor]) -> nn.Module:
        """A fresh training-time model holding ``wire``: the seeded expansion with ``wire`` received (one-factor
        lift: what it contracts to is exact either way, and that is all evaluation and deployment use)."""
        model = copy.deepcopy(self.template)
        self.receive(model, wire, spread=False)
        return model

    def compact_residual(self, report: LiftReport) -> float:
        """The largest lift residual over the layers that travel compact (fallback layers are loaded exactly)."""
        return max((max(x.residual, x.bias_residual) for x in report.layers if x.path not in self.layout.fallback),
                   default=0.0)


@functools.lru_cache(maxsize=2)
def _space_for(cfg_json: str) -> CompactSpace:
    from pipeline.transport.wire import config_from_json

    return CompactSpace(config_from_json(cfg_json))


def compact_space(cfg: RunConfig) -> CompactSpace | None:
    """The run's :class:`CompactSpace` when ExpandNet layers travel compact (one per process and config), else None."""
    if communicate_mode(cfg) != "compact":
        return None
    from pipeline.transport.wire import config_to_json

    return _space_for(config_to_json(cfg))
