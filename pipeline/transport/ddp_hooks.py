"""DDP communication hooks that count the gradient bytes each rank hands to allreduce, optionally compressed.

``comm`` specs: ``none`` (fp32 allreduce), ``fp16`` / ``bf16`` (cast buckets to half precision), and
``powersgd(R)`` (rank-R PowerSGD with error feedback, after ``start_iter`` plain warm-up steps). The hooks are
the stock ones from ``torch.distributed.algorithms.ddp_comm_hooks``; the wrapper only counts.

Unit: bytes of the tensors this rank passes to ``all_reduce`` (the payload). A ring allreduce moves about
``2 (n-1)/n`` times this over each rank's link, the same factor for every spec, so ratios are unaffected.
"""

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

_POWERSGD = re.compile(r"powersgd\((\d+)\)")


@dataclass
class CommStats:
    """Running totals of one rank's gradient exchange (reset per epoch by the caller if wanted)."""

    spec: str
    bytes: int = 0
    steps: int = 0
    calls: int = 0
    last_step_bytes: int = 0  # the latest complete step (steady state once PowerSGD's warm-up is over)
    _current: int = 0

    def per_step(self) -> float:
        return self.bytes / self.steps if self.steps else 0.0

    def snapshot(self) -> tuple[int, int]:
        """(bytes, steps) so far; subtract two snapshots to get an epoch's share."""
        return self.bytes, self.steps


def parse_comm(spec: str) -> tuple[str, int | None]:
    """``"powersgd(2)"`` -> ``("powersgd", 2)``; ``"fp16"`` -> ``("fp16", None)``; anything else raises."""
    if spec in ("none", "fp16", "bf16"):
        return spec, None
    m = _POWERSGD.fullmatch(spec)
    if m and int(m.group(1)) >= 1:
        return "powersgd", int(m.group(1))
    raise ValueError(f"engine.comm: expected none, fp16, bf16 or powersgd(RANK>=1), got {spec!r}")


class _HookState:
    """What DDP passes back to the hook: the inner hook's state plus the counters."""

    def __init__(self, kind: str, stats: CommStats, process_group, inner: Any) -> None:
        self.kind, self.stats, self.process_group, self.inner = kind, stats, process_group, inner


def _counting_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Run the configured hook on one bucket and add the bytes it sends to ``state.stats``.

    (No ``from __future__ import annotations`` in this module: DDP checks these annotations at runtime.)
    """
    buf = bucket.buffer()
    if state.kind == "none":
        sent = buf.numel() * buf.element_size()
        fut = default_hooks.allreduce_hook(state.process_group, bucket)
    elif state.kind in ("fp16", "bf16"):
        sent = buf.numel() * 2
        hook = default_hooks.fp16_compress_hook if state.kind == "fp16" else default_hooks.bf16_compress_hook
        fut = hook(state.process_group, bucket)
    else:
        ps: powerSGD_hook.PowerSGDState = state.inner
        warm_up = ps.iter < ps.start_powerSGD_iter
        before = ps.total_numel_after_compression
        fut = powerSGD_hook.powerSGD_hook(ps, bucket)
        numel = buf.numel() if warm_up else ps.total_numel_after_compression - before
        sent = numel * buf.element_size()
    st = state.stats
    st.bytes += int(sent)
    st.calls += 1
    st._current += int(sent)
    if bucket.is_last():
        st.steps += 1
        st.last_step_bytes, st._current = st._current, 0
    return fut


def register_comm_hook(model: nn.Module, spec: str, *, process_group=None, powersgd_start_iter: int = 2,
                       seed: int = 0) -> CommStats:
    """Install the counting (and compressing) hook on a DDP ``model``; returns its live :class:`CommStats`.

    ``powersgd_start_iter`` plain-allreduce steps precede PowerSGD (torch's minimum with error feedback is 2;
    its default of 1000 would make short runs uncompressed).
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_comm_hook needs a DistributedDataParallel model, got {type(model).__name__}")
    kind, rank = parse_comm(spec)
    inner = None
    if kind == "powersgd":
        inner = powerSGD_hook.PowerSGDState(process_group=process_group, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=max(2, powersgd_start_iter),
                                            use_error_feedback=True, warm_start=True, random_seed=seed)
    stats = CommStats(spec=spec)
    model.register_comm_hook(_HookState(kind, stats, process_group, inner), _counting_hook)
    return stats


def expected_dense_bytes(model: nn.Module, dtype_bytes: int = 4) -> int:
    """Bytes per step of an uncompressed allreduce: one element per trainable parameter element."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total * dtype_bytes
