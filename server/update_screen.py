"""The update screen: bound each client's update (reply - base) relative to the round's median update norm.

Works on decoded fp32 tensors (``base``: the global model the clients started from, ``replies``: their
decoded states), so it serves dense replies today and decoded codec updates tomorrow. Two groups are
screened separately, each against its own median: the parameters, and the BN running statistics (which
are excluded from the parameter norm because their scale is unrelated to the weights'; they get their own
bound so that nobody can poison the deployed model's normalisation either).

Rule (``engine.update_screen``): with ``m`` the round's median norm of a group and ``f`` the factor, an
update whose norm exceeds ``f * m`` is
- ``clip`` (default): scaled down to norm ``f * m`` (direction kept);
- ``drop``: refused with a reason;
- ``off``: passed unchanged.
Clip is the default because the worst case is the same for both (an attacker who knows the rule stays just
under ``f * m`` either way, so one reply moves the average by at most ``f * m / n``), while clipping keeps
the information of honest updates that are merely large (a client with more data, an early high-LR round)
instead of discarding it. Drop suits deployments that would rather lose a reply than keep part of it.
The screened state handed to the strategy is ``base + update``, so Flower's strategies keep their meaning.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from models.state import BN_STAT_NAMES

#: update groups screened separately (each against its own median norm)
GROUPS = ("parameters", "bn statistics")


@dataclass
class ScreenedUpdate:
    """The outcome for one reply: the state to aggregate (None when dropped) and what the screen did."""

    state: dict[str, torch.Tensor] | None
    norms: dict[str, float]
    action: str  # "kept" | "clipped" | "dropped"
    reason: str | None = None


def group_of(key: str) -> str:
    """The screening group of a trainable-state key (BN running statistics vs everything else)."""
    return GROUPS[1] if key.rsplit(".", 1)[-1] in BN_STAT_NAMES else GROUPS[0]


def update_norms(base: Mapping[str, torch.Tensor], reply: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of ``reply - base`` per group (groups without tensors are absent)."""
    sums: dict[str, float] = {}
    for key, value in reply.items():
        group = group_of(key)
        sums[group] = sums.get(group, 0.0) + float(((value.double() - base[key].double()) ** 2).sum())
    return {g: s ** 0.5 for g, s in sums.items()}


def screen_updates(base: Mapping[str, torch.Tensor], replies: Sequence[Mapping[str, torch.Tensor]],
                   kind: str, factor: float) -> list[ScreenedUpdate]:
    """Screen every reply's update against ``factor`` x the round's median norm of each group (module doc)."""
    if kind not in ("clip", "drop", "off"):
        raise ValueError(f"engine.update_screen.kind must be clip, drop or off, got {kind!r}")
    if factor < 1:
        raise ValueError(f"engine.update_screen.factor must be >= 1, got {factor}")
    norms = [update_norms(base, r) for r in replies]
    if kind == "off" or not replies:
        return [ScreenedUpdate(dict(r), n, "kept") for r, n in zip(replies, norms, strict=True)]
    bounds = {g: factor * statistics.median(n[g] for n in norms) for g in GROUPS if g in norms[0]}
    out = []
    for reply, norm in zip(replies, norms, strict=True):
        scales = {g: bounds[g] / norm[g] for g in bounds if norm[g] > bounds[g]}
        if not scales:
            out.append(ScreenedUpdate(dict(reply), norm, "kept"))
        elif kind == "drop":
            group = min(scales, key=scales.get)
            out.append(ScreenedUpdate(None, norm, "dropped", f"{group} update norm {norm[group]:.4g} exceeds "
                                      f"{bounds[group]:.4g} ({factor:g} x the round's median)"))
        else:
            state = {k: _clipped(base[k], v, scales[group_of(k)]) if group_of(k) in scales else v
                     for k, v in reply.items()}
            out.append(ScreenedUpdate(state, norm, "clipped"))
    return out


def _clipped(base: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """``base + scale * (value - base)``, computed in float64 so huge finite replies cannot overflow to NaN."""
    return (base.double() + (value.double() - base.double()) * scale).to(value.dtype)
