"""DDP communication hooks that count the gradient bytes each rank sends, optionally compressed.

``transport.comm`` specs:

- ``none`` (fp32 allreduce), ``fp16`` / ``bf16`` (cast buckets to half precision), ``powersgd(R)`` (rank-R
  PowerSGD with its own error feedback, after ``start_iter`` plain warm-up steps): the stock hooks of
  ``torch.distributed.algorithms.ddp_comm_hooks``, which this module only counts;
- a codec chain of :mod:`pipeline.transport.codecs` (``topk(frac=0.01)+qsgd(bits=8,block=256)``, ``sign``,
  ...): each rank encodes each bucket (plus its error-feedback residuals when ``transport.error_feedback`` is
  on, kept per parameter so that DDP's re-bucketing after the first step keeps them), the encoded payloads
  are exchanged with ``all_gather`` (allreduce cannot sum payloads whose supports and scales differ per
  rank), and every rank decodes all of them and averages. Stochastic rounding is seeded by (seed, step,
  rank, bucket index); :meth:`CommStats.state_dict` holds what a resumed rank needs (step counter and
  residuals). A resumed DDP starts with its initial buckets again, so its first step is encoded per
  bucket differently from an uninterrupted run: resume is exact in its state, not bit-identical in that
  step.

Unit: **bytes this rank sends per step**. For allreduce specs: the tensors this rank passes to
``all_reduce``; a ring allreduce moves about ``2 (n-1)/n`` times this over each link, whatever n. For codec
specs: this rank's encoded payload (:attr:`Encoded.nbytes` plus a 4-byte length for variable-size index
streams) plus the 8-byte length word exchanged first. An allgather delivers every rank's payload to every
other rank, so each rank *receives* about ``(n-1)`` times this: allgather traffic grows with the number of
workers, allreduce traffic does not. ``CommStats.padding`` counts the extra bytes of the fixed-size gloo/NCCL
allgather (each payload is padded to the largest rank's length); they are not part of ``bytes``.
"""

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from pipeline.transport.codecs import Chain, CodecContext, parse_chain
from pipeline.transport.error_feedback import ErrorFeedback

_POWERSGD = re.compile(r"powersgd\((\d+)\)")


@dataclass
class CommStats:
    """Running totals of one rank's gradient exchange (reset per epoch by the caller if wanted)."""

    spec: str
    bytes: int = 0
    steps: int = 0
    calls: int = 0
    last_step_bytes: int = 0  # the latest complete step (steady state once PowerSGD's warm-up is over)
    padding: int = 0  # codec specs: allgather padding to the largest payload (not in ``bytes``)
    error_feedback: ErrorFeedback | None = None  # codec specs with error feedback: per-bucket residuals
    _current: int = 0

    def per_step(self) -> float:
        return self.bytes / self.steps if self.steps else 0.0

    def snapshot(self) -> tuple[int, int]:
        """(bytes, steps) so far; subtract two snapshots to get an epoch's share."""
        return self.bytes, self.steps

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a codec hook continues from after a resume (one per rank): the step counter, which seeds the
        stochastic rounding, and the error-feedback residuals (keyed by parameter name)."""
        out = {"steps": torch.tensor([self.steps], dtype=torch.int64)}
        if self.error_feedback is not None:
            out.update({f"ef/{k}": v for k, v in self.error_feedback.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict` (residuals only when this hook runs error feedback)."""
        if "steps" not in state or state["steps"].numel() != 1:
            raise ValueError("comm hook state lacks its step counter")
        self.steps = int(state["steps"].reshape(-1)[0])
        residuals = {k.removeprefix("ef/"): v for k, v in state.items() if k.startswith("ef/")}
        if self.error_feedback is not None:
            self.error_feedback.load_state_dict(residuals)
        elif residuals:
            raise ValueError("comm hook state holds error-feedback residuals, but error feedback is off")


def parse_comm(spec: str) -> tuple[str, int | None]:
    """``"powersgd(2)"`` -> ``("powersgd", 2)``; ``"fp16"`` -> ``("fp16", None)``; a codec chain ->
    ``("codec", None)``; anything else raises a ValueError naming ``transport.comm``."""
    if spec in ("none", "fp16", "bf16"):
        return spec, None
    m = _POWERSGD.fullmatch(spec)
    if m and int(m.group(1)) >= 1:
        return "powersgd", int(m.group(1))
    if not spec.startswith("powersgd"):
        try:
            chain = parse_chain(spec)
        except ValueError as exc:
            raise ValueError(f"transport.comm: {exc}") from None
        if any(stage.matrix for stage in chain.stages):
            raise ValueError(f"transport.comm: {chain.stages[0].descriptor()} factors each tensor's matrix view, "
                             "but DDP's gradient buckets are flat: use powersgd(RANK)")
        if chain.stages:
            return "codec", None
    raise ValueError(f"transport.comm: expected none, fp16, bf16, powersgd(RANK>=1) or a codec chain, got {spec!r}")


class _HookState:
    """What DDP passes back to the hook: the inner hook's state plus the counters."""

    def __init__(self, kind: str, stats: CommStats, process_group, inner: Any) -> None:
        self.kind, self.stats, self.process_group, self.inner = kind, stats, process_group, inner


class _CodecState:
    """State of the codec hook: the chain, the counters, the seed of the rounding, parameter names (residuals
    are kept per parameter, so they survive DDP re-bucketing)."""

    def __init__(self, chain: Chain, stats: CommStats, process_group, seed: int, names: dict[int, str]) -> None:
        self.chain, self.stats, self.process_group, self.seed, self.names = chain, stats, process_group, seed, names
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)


def _gather_payloads(payload: torch.Tensor, process_group) -> list[torch.Tensor]:
    """Every rank's uint8 payload (lengths exchanged first, payloads padded to the longest for all_gather)."""
    world = dist.get_world_size(process_group)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=payload.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=process_group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=payload.device)
    padded[: payload.numel()] = payload
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=process_group)
    return [g[: int(s)] for g, s in zip(gathered, sizes, strict=True)]


def codec_mean(grad: torch.Tensor, chain: Chain, ctx: CodecContext, stats: CommStats, process_group,
               pieces: list[tuple[str, int]]) -> tuple[torch.Tensor, int]:
    """(mean over ranks of every rank's decoded ``grad``, bytes this rank sent) through ``chain`` and all_gather.

    ``pieces`` names the consecutive slices of ``grad`` (name, numel) under which ``stats.error_feedback`` keeps
    its residuals; allgather padding is added to ``stats.padding``. Shared by the DDP codec hook (one call per
    bucket) and :mod:`pipeline.transport.compact_sync` (one call per fused ExpandNets layer).
    """
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    ef = stats.error_feedback
    names, sizes = [n for n, _ in pieces], [k for _, k in pieces]
    grad = grad.detach().float()
    if ef is not None:
        grad = torch.cat([ef.compensate(n, g, stats.steps) for n, g in zip(names, grad.split(sizes), strict=True)])
    encoded = chain.encode(grad, ctx)
    own = chain.decode(encoded)
    if ef is not None:
        for n, c, o in zip(names, grad.split(sizes), own.split(sizes), strict=True):
            ef.record(n, c, o, stats.steps)
    payload = chain.to_bytes(encoded).to(grad.device)
    payloads = _gather_payloads(payload, process_group)
    total = torch.zeros_like(own)
    for r, data in enumerate(payloads):
        total += own if r == rank else chain.decode(chain.from_bytes(data, encoded.shape))
    stats.padding += max(p.numel() for p in payloads) - payload.numel()
    return total / world, payload.numel() + 8


def _codec_hook(state: _CodecState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Encode this rank's bucket (with error feedback), allgather the payloads, decode and average them.

    Stochastic rounding is seeded by (seed, step, rank, bucket index), so reruns are bit-identical.
    """
    buf = bucket.buffer()
    st = state.stats
    ctx = CodecContext(seed=state.seed, round=st.steps, partition=state.rank, name=f"bucket{bucket.index()}")
    pieces = [(state.names[id(p)], p.numel()) for p in bucket.parameters()]
    mean, sent = codec_mean(buf, state.chain, ctx, st, state.process_group, pieces)
    _count(st, sent, bucket)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(mean.to(buf.dtype))
    return fut


def _count(st: CommStats, sent: int, bucket: dist.GradBucket) -> None:
    st.bytes += int(sent)
    st.calls += 1
    st._current += int(sent)
    if bucket.is_last():
        st.steps += 1
        st.last_step_bytes, st._current = st._current, 0


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
    _count(state.stats, sent, bucket)
    return fut


def register_comm_hook(model: nn.Module, spec: str, *, process_group=None, powersgd_start_iter: int = 2,
                       seed: int = 0, error_feedback: bool = False, residual_decay: float = 1.0) -> CommStats:
    """Install the counting (and compressing) hook on a DDP ``model``; returns its live :class:`CommStats`.

    ``powersgd_start_iter`` plain-allreduce steps precede PowerSGD (torch's minimum with error feedback is 2;
    its default of 1000 would make short runs uncompressed). ``error_feedback``/``residual_decay`` apply to
    codec chains (``transport.error_feedback``); the stock specs refuse them.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_comm_hook needs a DistributedDataParallel model, got {type(model).__name__}")
    kind, rank = parse_comm(spec)
    if kind == "codec":
        ef = ErrorFeedback(residual_decay) if error_feedback else None
        stats = CommStats(spec=spec, error_feedback=ef)
        names = {id(p): n for n, p in model.module.named_parameters()}
        model.register_comm_hook(_CodecState(parse_chain(spec), stats, process_group, seed, names), _codec_hook)
        return stats
    if error_feedback:
        raise ValueError(f"transport.error_feedback applies to codec chains, not to comm {spec!r}")
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
