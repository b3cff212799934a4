"""Exact, compact-size gradient exchange for fused ExpandNets under DDP (``transport.expand_sync: compact``).

Why it is exact. In fused mode every step each expanded layer composes its compact kernel ``W`` and bias ``b``
from its factors (``_Expanded.composed()``) and then runs the compact op. The loss reaches the factors only
through ``(W, b)``, so a factor's gradient is ``J^T g`` with ``g = (dL/dW, dL/db)`` and ``J`` the Jacobian of
the composition at the current factors. All ranks hold identical factors, hence the same ``J``, and

    mean_r J^T g_r  =  J^T mean_r g_r :

averaging the compact-size ``g`` across ranks and then backpropagating it into the factors locally gives
exactly ordinary DDP's (averaged) factor gradients, at the compact net's bytes instead of the chain's.

How. The factors leave DDP's gradient buckets (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``
with :meth:`CompactGradSync.factor_names`, before DDP is built). Each layer's ``composed()`` is wrapped so that
the ``(W, b)`` it returns pass through an identity autograd function whose backward averages ``(dL/dW, dL/db)``
(stacked into one flat tensor, one collective per layer per step) before autograd carries it on into the
factors. This is the explicit-collective choice, not a DDP proxy leaf: a proxy leaf would need a second
backward after DDP's (``W.backward(W_proxy.grad)``) in the training loop and an extra leaf kept out of
``trainable_state`` and the state dict; the autograd function needs neither, keeps the one training loop
(``pipeline.train``) unchanged, and overlaps each layer's exchange with the rest of the backward like a
DDP bucket. Its collectives run on a process group of their own, so their order never interleaves with
DDP's bucket allreduces on the default group.

Conditions (checked where possible): fused mode (explicit mode runs the chain layer by layer and has no
``W``: refused); no loss term may read the factors except through ``W``, ``b`` (true of every loss in
``pipeline.distill``; a penalty on the factors would be averaged nowhere). Weight decay and momentum are
fine: the optimizer applies them to the already averaged factor gradients, on identical factors, exactly as
under ordinary DDP. Gradient clipping likewise sees the same averaged gradients.

Compression. ``transport.comm`` applies to the compact gradients as it does to DDP buckets: ``none`` (fp32
allreduce), ``fp16``/``bf16`` (the stock hooks' rule: cast, divide by the world size, allreduce, cast back)
and codec chains (:func:`pipeline.transport.ddp_hooks.codec_mean`, with per-layer error-feedback residuals).
With compression the result is a different, compressed approximation, as for any layer. ``powersgd(R)`` is
refused (its state is per DDP bucket; use ``expand_sync: factors``). Bytes are counted in the unit of
:mod:`pipeline.transport.ddp_hooks`: bytes this rank sends per step.

Drift. Averaged gradients are bitwise identical on every rank and the factor backward is deterministic, so
factors stay identical on one kind of hardware; :meth:`CompactGradSync.broadcast_factors` copies rank 0's
factors to every rank at each checkpoint (epoch end) so rounding drift on mixed hardware cannot accumulate.

CSG, the same reasoning. A CSG layer's filters are ``G(code)`` with the generator ``G`` shared and the codes
per layer; its trainable state *is* (codes, generator), already smaller than the filters it produces, so the
DDP buckets of a CSG model already carry its smallest payload: averaging ``dL/dfilter`` instead would send
the (larger) dense filters. Nothing to add for CSG.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.expandnets import expanded_layers
from pipeline.transport.codecs import CodecContext, parse_chain
from pipeline.transport.ddp_hooks import CommStats, codec_mean, parse_comm
from pipeline.transport.error_feedback import ErrorFeedback


def compact_sync_problem(model: nn.Module, spec: str) -> str | None:
    """Why ``model`` cannot use compact sync under comm ``spec`` (None if it can; also None with no expansion)."""
    layers = dict(expanded_layers(model))
    explicit = [n for n, m in layers.items() if m.mode != "fused"]
    if explicit:
        return (f"transport.expand_sync: compact needs fused ExpandNets layers, but {explicit[0]!r} runs in "
                f"{layers[explicit[0]].mode!r} mode (no compact W exists); use expand_sync: factors")
    kind, _ = parse_comm(spec)
    if layers and kind == "powersgd":
        return f"transport.expand_sync: compact does not support comm {spec!r}; use expand_sync: factors"
    return None


class _AverageCompactGrad(torch.autograd.Function):
    """Identity on ``(W, b)`` forward; backward replaces ``(dL/dW, dL/db)`` by their mean over ranks."""

    @staticmethod
    def forward(ctx: Any, sync: CompactGradSync, name: str, w: torch.Tensor, *b: torch.Tensor):  # noqa: ANN205
        ctx.sync, ctx.name = sync, name
        return (w.view_as(w), *(t.view_as(t) for t in b))

    @staticmethod
    def backward(ctx: Any, gw: torch.Tensor, *gb: torch.Tensor):  # noqa: ANN205
        flat = torch.cat([gw.reshape(-1), *(g.reshape(-1) for g in gb)])
        mean = ctx.sync.average(ctx.name, flat)
        parts = mean.split([gw.numel(), *(g.numel() for g in gb)])
        return (None, None, parts[0].view_as(gw), *(p.view_as(g) for p, g in zip(parts[1:], gb, strict=True)))


class _SyncedComposed:
    """A layer's ``composed()`` whose ``(W, b)``, when grad flows, are averaged across ranks in backward.

    A deep copy of the layer gets a pass-through wrapper bound to the copy (copies never join collectives).
    """

    def __init__(self, layer: nn.Module, name: str, sync: CompactGradSync | None) -> None:
        self.layer, self.name, self.sync = layer, name, sync

    def __call__(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = type(self.layer).composed(self.layer, dtype)
        if self.sync is None or not (torch.is_grad_enabled() and w.requires_grad):
            return w, b  # evaluation, deployment contraction: nothing flows back
        self.sync._pending += 1
        if b is None:
            return _AverageCompactGrad.apply(self.sync, self.name, w)[0], None
        return tuple(_AverageCompactGrad.apply(self.sync, self.name, w, b))

    def __deepcopy__(self, memo: dict[int, Any]) -> _SyncedComposed:
        return _SyncedComposed(copy.deepcopy(self.layer, memo), self.name, None)


class CompactGradSync:
    """Average the compact ``(dL/dW, dL/db)`` of every fused expanded layer of ``model`` across ranks.

    Build it on every rank (collectively: it creates its own process group) before wrapping ``model`` in DDP;
    pass :meth:`factor_names` to DDP's ignore list. ``stats`` counts the bytes this rank sends (a step ends
    when every layer composed with grad in forward has been averaged in backward). :meth:`remove` restores
    the layers.
    """

    def __init__(self, model: nn.Module, spec: str = "none", *, seed: int = 0, error_feedback: bool = False,
                 residual_decay: float = 1.0) -> None:
        problem = compact_sync_problem(model, spec)
        if problem:
            raise ValueError(problem)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("CompactGradSync needs an initialised torch.distributed process group")
        self.kind, _ = parse_comm(spec)
        if error_feedback and self.kind != "codec":
            raise ValueError(f"transport.error_feedback applies to codec chains, not to comm {spec!r}")
        self.chain = parse_chain(spec) if self.kind == "codec" else None
        self.seed = seed
        self.group = dist.new_group(list(range(dist.get_world_size())))
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.stats = CommStats(spec=spec, error_feedback=ErrorFeedback(residual_decay) if error_feedback else None)
        self.layers = dict(expanded_layers(model))
        self._pending = 0
        for name, layer in self.layers.items():
            layer.composed = _SyncedComposed(layer, name, self)

    def remove(self) -> None:
        """Unwrap the layers' ``composed`` (the model's own method again)."""
        for layer in self.layers.values():
            if "composed" in vars(layer):
                del layer.composed

    def factor_names(self) -> list[str]:
        """Qualified names of every factor parameter (what DDP must ignore)."""
        return [f"{name}.{p}" for name, layer in self.layers.items() for p, _ in layer.named_parameters()]

    def factors(self) -> list[torch.Tensor]:
        return [p for layer in self.layers.values() for p in layer.parameters()]

    @torch.no_grad()
    def broadcast_factors(self, src: int = 0) -> None:
        """Copy rank ``src``'s factors to every rank (at start and each checkpoint: no drift can accumulate)."""
        for p in self.factors():
            dist.broadcast(p.data, src=src, group=self.group)

    def average(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of the flat compact gradient of layer ``name`` under the configured comm."""
        st = self.stats
        if self.kind == "none":
            out = grad.clone()
            dist.all_reduce(out, group=self.group)
            out.div_(self.world)
            sent = out.numel() * out.element_size()
        elif self.kind in ("fp16", "bf16"):
            half = grad.to(torch.float16 if self.kind == "fp16" else torch.bfloat16).div_(self.world)
            dist.all_reduce(half, group=self.group)
            out, sent = half.to(grad.dtype), half.numel() * 2
        else:
            ctx = CodecContext(seed=self.seed, round=st.steps, partition=self.rank, name=f"compact/{name}")
            mean, sent = codec_mean(grad, self.chain, ctx, st, self.group, [(f"{name}.compact", grad.numel())])
            out = mean.to(grad.dtype)
        st.bytes += int(sent)
        st.calls += 1
        st._current += int(sent)
        self._pending -= 1
        if self._pending <= 0:
            self._pending = 0
            st.steps += 1
            st.last_step_bytes, st._current = st._current, 0
        return out


def compact_param_count(model: nn.Module) -> int:
    """Elements a step averages under compact sync: non-factor trainable parameters plus each layer's W and b."""
    layers = dict(expanded_layers(model))
    factor_ids = {id(p) for m in layers.values() for p in m.parameters()}
    rest = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in factor_ids)
    with torch.no_grad():
        compact = sum(t.numel() for m in layers.values() for t in m.composed() if t is not None)
    return rest + compact
