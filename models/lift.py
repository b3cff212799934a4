"""Lifting: write a compact model's weights into an ExpandNet's factors, changing the factors as little as possible.

``lift(expanded, compact_state)`` makes ``models.contract(expanded)`` equal the compact model whose
``models.trainable_state`` is ``compact_state``: tensors of non-expanded layers (BatchNorm, the classifier,
1x1 convs under CL, ...) are copied, and each expanded layer's chain gets the minimal-norm correction of ONE
factor (with ``spread=True``, :func:`spread_correction` first moves all factors jointly, see there). It works
IN PLACE, like ``models.load_trainable_state`` (its analogue for plain models): a client keeps its factors
(and the optimizer that points at them) and only corrects them; ``expand``/``contract`` return
new modules because they change the architecture, ``lift`` changes values only.

The maths (float64 throughout; a chain ``W_1 .. W_L`` contracts to ``K = Q * W_j * P`` where ``P`` composes
the factors before ``j`` and ``Q`` those after it, so ``K`` is linear in ``W_j`` with the others fixed, and
every group of a grouped/depthwise layer is an independent problem):

- **Sandwich** (``P`` and ``Q`` both 1x1: the middle kxk factor of CL, any factor of FC). Per group and per
  kernel tap ``K_t = Q W_t P``, so ``W_t' = W_t + pinv(Q) (K*_t - K_t) pinv(P)`` is the minimal-norm
  correction (the pseudo-inverse of ``P^T (x) Q`` is ``pinv(P)^T (x) pinv(Q)``). It reaches every kernel iff
  ``P`` has full column rank and ``Q`` full row rank (rank checked by SVD); that needs rate >= 1.
- **End factors** (CK, whose factors are all 3x3). The last factor acts per output channel through ONE small
  matrix ``M`` (prefix kernel -> compact kernel row), the first per input channel through one matrix ``N``;
  both are built exactly by composing the prefix/suffix with a basis of the factor. The correction is
  ``pinv(M)`` applied to every channel's kernel change; the map reaches every kernel iff ``M`` (or ``N``) has
  full row rank, which needs e.g. ``9 q >= k^2 m`` for the last factor (SmallNet-7 inner layers at r=4).
- **Middle factors with spatial neighbours** (CK 7x7 and larger): no structure to exploit, so the map is
  formed explicitly per group (a basis of the factor composed with prefix and suffix) and pseudo-inverted
  (e.g. depthwise 7x7 at r=4, whose end factors cannot reach: 36 < 49 unknowns per channel). Explicit maps
  (this one and ``M``, ``N``) are formed only up to ``MAX_MAP_ENTRIES`` entries; larger ones are not tried
  (a layer with no candidate left is a fallback, unchanged).
- Preference: the sandwich factor nearest the chain's middle (the CL kxk factor, the FC middle factor), then
  the last factor, the first, the explicit middles. The first candidate whose float64 relative residual is
  <= ``REACH_TOL`` is used; a dimension count skips hopeless ones first, and the numerical rank of each map
  (singular values above ``max(rows, cols) * eps * s_max``) is reported: full rank is what reaches EVERY
  kernel, a rank-deficient map reaches only the targets in its range.
- Not reached (the target lies outside every candidate's range: a random kernel for the CK image conv
  3->3->32->8 of SmallNet-7, whose last factor's map has rank 600 of 1,176; rates below 1; CK 7x7 at r=2):
  the layer is a **fallback**. ``lift`` still applies the least-squares minimal-norm correction of the
  candidate that gets closest and reports the residual; the caller must send such a layer's factors instead
  of trusting its compact weight.
- The bias is solved after the weights: the chain's contracted bias with the new weights is compared with the
  target and the difference goes on the last layer's bias, which shifts the contracted bias by exactly that.

A node without factors (first round, new node) starts from :func:`seeded_expansion` (``models.expand`` under
a seed every node shares) and lifts the received compact state into it.

:func:`balance` rescales each chain's factors to equal norms without changing what it contracts to (factor
``i`` times ``s_i`` with ``prod s_i = 1``, its bias times ``s_1 .. s_i``). Lifting corrects ONE factor round
after round; left alone, that factor grows while the others shrink (measured: the last CK factor reached a
norm of 1e16 by round 18 of a federated run and training diverged), so a node balances its chains around
every lift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.expand_algebra import chain_plan, compose_chain, compose_pair
from models.expand_layers import ExpandedLinear
from models.expandnets import contract, expand, expanded_layers
from models.state import _invalidate_caches, trainable_state, unwrap

__all__ = ["LayerLift", "LiftReport", "balance", "lift", "seeded_expansion", "spread_correction", "REACH_TOL"]

REACH_TOL = 1e-9  # a candidate "reaches" the target when its float64 relative residual is at most this
MAX_MAP_ENTRIES = 20_000_000  # largest explicit map formed (all groups; float64: 160 MB plus its SVD)


@dataclass(frozen=True)
class LayerLift:
    """What lifting did to one expanded layer (``path`` as in ``named_modules``)."""

    path: str
    kind: str  # "cl" | "ck" | "fc"
    factor: int  # index of the corrected factor: ``<path>.chain.<factor>.weight``
    map_rank: int  # numerical rank of that factor's linear map onto the compact kernel
    kernel_entries: int  # entries of the compact kernel: the rank needed to reach every kernel
    residual: float  # ||K - K*||_F / ||K*||_F of the contracted kernel as written (model dtype)
    bias_residual: float  # the same for the bias (0.0 when the layer has none)
    fallback: bool  # True: not reached (float64 residual > REACH_TOL); send this layer's factors instead


@dataclass(frozen=True)
class LiftReport:
    """Per expanded layer, how it was lifted; ``copied`` lists the compact keys copied as they are."""

    layers: tuple[LayerLift, ...]
    copied: tuple[str, ...]

    @property
    def fallbacks(self) -> list[str]:
        """Paths of the layers whose chain could not reach the target weight."""
        return [layer.path for layer in self.layers if layer.fallback]

    @property
    def max_residual(self) -> float:
        """The largest relative residual (kernel or bias) over all expanded layers."""
        return max((max(x.residual, x.bias_residual) for x in self.layers), default=0.0)


def seeded_expansion(compact: nn.Module, strategy: str, rate: float = 4, seed: int = 0,
                     mode: str = "fused") -> nn.Module:
    """The initial factors every node can rebuild: ``models.expand(compact, ...)`` with torch seeded to ``seed``.

    The global RNG is restored afterwards. Equal on every node given the same architecture, strategy, rate,
    seed and torch version; a node without factors starts here, then :func:`lift`\\ s the compact state into it.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return expand(compact, strategy, rate=rate, mode=mode)


def lift(expanded: nn.Module, compact_state: dict[str, torch.Tensor], spread: bool = False) -> LiftReport:
    """Make ``models.contract(expanded)`` equal the compact model with ``compact_state``, in place.

    ``compact_state`` has exactly the keys and shapes of ``models.trainable_state(models.contract(expanded))``
    (a ValueError names the first missing, unexpected or mis-shaped key; nothing is modified then). Tensors of
    non-expanded layers are copied; each expanded layer gets the minimal-norm correction of one factor and its
    bias (see the module docstring). With ``spread``, :func:`spread_correction` first moves ALL factors of each
    chain by the minimal-norm change that reaches the target to first order, and the one-factor solve only
    removes what is left (second order). Returns what was done per layer, fallbacks included.
    """
    model = unwrap(expanded)
    targets = _check_state(model, compact_state)
    own = trainable_state(model)
    copied = [k for k in compact_state if k in own]
    reports = []
    with torch.no_grad():
        for k in copied:
            own[k].copy_(torch.as_tensor(compact_state[k]).to(device=own[k].device, dtype=own[k].dtype))
        for path, layer in expanded_layers(model):
            w, b = targets[path]
            if spread:
                spread_correction(layer, w)
            reports.append(_lift_layer(path, layer, w, b))
    _invalidate_caches(model)
    return LiftReport(tuple(reports), tuple(copied))


def spread_correction(layer: nn.Module, w_target: torch.Tensor, steps: int = 1, cg_iters: int = 20) -> float:
    """Move every factor of ``layer``'s chain towards contracting to ``w_target``, changing them least, in place.

    The contracted kernel ``K(W_1 .. W_L)`` is linear in each factor, so its Jacobian ``J`` is exact and cheap:
    ``J d = sum_j K(.., d_j, ..)`` and ``J^T y`` is one backward pass. Each Gauss-Newton step solves
    ``J J^T y = K* - K`` by conjugate gradients (float64) and adds ``d = J^T y``: the minimal-norm change of
    all factors together. Why: a gradient step on the factors is ``-lr J^T dL/dK``, so the averaged factor
    update of federated ExpandNets lies in the range of ``J^T`` to first order, and this lift of the averaged
    compact update reproduces factor averaging there, where a one-factor correction puts everything on one
    factor. A step that does not lower the residual is not taken (an unreachable target: fallback layers).
    ``steps`` and ``cg_iters`` bound the cost (SmallNet-7 CK r=4 at the defaults, one thread, load 0.85: 0.21 s
    for ``stages.1.0``, 1.12 s for ``stages.2.0``); what they leave is second order and goes to the one-factor
    solve. Returns the relative residual left.
    """
    groups = getattr(layer.chain[0], "groups", 1)
    ws = [_as_conv(c.weight.detach()).to(torch.float64) for c in layer.chain]
    target = _as_conv(w_target).to(ws[0])
    plan = chain_plan([w.shape for w in ws], groups)  # every kernel below composes factors of these shapes

    def kernel(factors: list[torch.Tensor]) -> torch.Tensor:
        return compose_chain(factors, [None] * len(factors), groups, plan)[0]

    def jvp(ds: list[torch.Tensor]) -> torch.Tensor:
        return sum(kernel(ws[:j] + [ds[j]] + ws[j + 1:]) for j in range(len(ws)))  # type: ignore[return-value]

    def vjp(y: torch.Tensor) -> list[torch.Tensor]:
        leaves = [w.detach().requires_grad_(True) for w in ws]
        with torch.enable_grad():
            return list(torch.autograd.grad(kernel(leaves), leaves, grad_outputs=y))

    residual = target - kernel(ws)
    for _ in range(steps):
        scale = float(residual.norm())
        if scale == 0.0:
            break
        y, r = torch.zeros_like(residual), residual.clone()
        p, rr = r.clone(), float((r * r).sum())
        for _ in range(cg_iters):
            ap = jvp(vjp(p))
            curvature = float((p * ap).sum())
            if curvature <= 0.0:
                break
            alpha = rr / curvature
            y, r = y + alpha * p, r - alpha * ap
            rr_next = float((r * r).sum())
            if rr_next <= (1e-10 * scale) ** 2:
                break
            p, rr = r + (rr_next / rr) * p, rr_next
        trial = [w + d for w, d in zip(ws, vjp(y), strict=True)]
        trial_residual = target - kernel(trial)
        if not float(trial_residual.norm()) < scale:  # no progress (an unreachable target): keep what we have
            break
        ws, residual = trial, trial_residual
    with torch.no_grad():
        for conv, w in zip(layer.chain, ws, strict=True):
            conv.weight.copy_(w.reshape(conv.weight.shape).to(conv.weight.dtype))
    return _rel(residual, target)


def balance(expanded: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Give every factor of each expanded layer's chain the same Frobenius norm, in place, contraction unchanged.

    With norms ``n_i`` and their geometric mean ``g``, factor ``i`` is scaled by ``s_i = g / n_i`` (so
    ``prod s_i = 1``) and its bias by ``s_1 .. s_i``, which leaves the contracted weight and bias exactly as
    they were (float64 maths). Layers named in ``skip`` (e.g. factors that travel as they are) and chains
    with a zero factor are left alone.
    """
    model = unwrap(expanded)
    with torch.no_grad():
        for path, layer in expanded_layers(model):
            if path in skip:
                continue
            norms = [c.weight.detach().to(torch.float64).norm() for c in layer.chain]
            if any(n == 0 for n in norms):
                continue
            mean = torch.exp(torch.stack([n.log() for n in norms]).mean())
            cumulative = torch.ones((), dtype=torch.float64)
            for conv, norm in zip(layer.chain, norms, strict=True):
                scale = mean / norm
                cumulative = cumulative * scale
                conv.weight.copy_((conv.weight.detach().to(torch.float64) * scale).to(conv.weight.dtype))
                if conv.bias is not None:
                    conv.bias.copy_((conv.bias.detach().to(torch.float64) * cumulative).to(conv.bias.dtype))
    _invalidate_caches(model)


# ------------------------------------------------------------------------------------------------ checks
def _check_state(model: nn.Module, state: dict[str, torch.Tensor]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Path -> (target weight, target bias) per expanded layer, after checking keys and shapes of ``state``."""
    expected = {k: tuple(v.shape) for k, v in trainable_state(contract(model)).items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise ValueError(f"compact state does not fit {type(model).__name__}: {what} "
                         f"({len(missing)} missing, {len(extra)} unexpected)")
    for k, shape in expected.items():
        got = tuple(torch.as_tensor(state[k]).shape)
        if got != shape:
            raise ValueError(f"compact state key {k!r}: expected shape {shape}, got {got}")
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    targets = {}
    for path, layer in expanded_layers(model):
        if len(paths[id(layer)]) > 1:  # contract() replaces only its first slot, so its compact state is ambiguous
            raise ValueError(f"cannot lift the expanded layer shared by {', '.join(map(repr, paths[id(layer)]))}")
        targets[path] = _target(state, path)
    return targets


def _target(state: dict[str, torch.Tensor], path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target weight and bias of the layer at ``path``, float64."""
    prefix = f"{path}." if path else ""
    w = torch.as_tensor(state[prefix + "weight"]).to(torch.float64)
    b = state.get(prefix + "bias")
    return w, (None if b is None else torch.as_tensor(b).to(torch.float64))


# ------------------------------------------------------------------------------------------------ one layer
@dataclass(frozen=True)
class _Solution:
    factor: int
    delta: torch.Tensor  # float64 correction of the factor, in 4-D conv layout
    map_rank: int
    residual: float  # float64 relative residual of the kernel with the corrected factor


def _as_conv(w: torch.Tensor) -> torch.Tensor:
    """A Linear weight ``(out, in)`` as the 1x1 conv kernel ``(out, in, 1, 1)``; conv kernels unchanged."""
    return w[:, :, None, None] if w.dim() == 2 else w


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, ExpandedLinear):
        return "fc"
    return "cl" if len(layer.chain) == 3 and layer.chain[0].kernel_size == (1, 1) else "ck"


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> float:
    """``||diff|| / ||ref||`` (Frobenius), or ``||diff||`` when the reference is zero."""
    scale = ref.norm().item()
    return diff.norm().item() / scale if scale > 0 else diff.norm().item()


def _lift_layer(path: str, layer: nn.Module, w_target: torch.Tensor, b_target: torch.Tensor | None) -> LayerLift:
    """Correct one factor of ``layer`` so that its chain contracts to ``w_target``, then fix the bias."""
    groups = getattr(layer.chain[0], "groups", 1)
    ws = [_as_conv(c.weight.detach()).to(torch.float64) for c in layer.chain]
    k_target = _as_conv(w_target).to(ws[0].device)
    b_target = None if b_target is None else b_target.to(ws[0].device)
    k_now, _ = layer.composed(torch.float64)
    dk = k_target - _as_conv(k_now.detach())
    solution = _solve(ws, groups, dk, k_target)
    fallback = solution.residual > REACH_TOL
    factor = layer.chain[solution.factor].weight
    factor.copy_((ws[solution.factor] + solution.delta).reshape(factor.shape).to(factor.dtype))
    if b_target is not None:
        _, b_now = layer.composed(torch.float64)
        last = layer.chain[-1].bias
        last.copy_((last.detach().to(torch.float64) + (b_target - b_now.detach())).to(last.dtype))
    k_new, b_new = layer.composed(torch.float64)
    return LayerLift(path=path, kind=_kind(layer), factor=solution.factor, map_rank=solution.map_rank,
                     kernel_entries=dk.numel(), residual=_rel(_as_conv(k_new.detach()) - k_target, k_target),
                     bias_residual=0.0 if b_target is None else _rel(b_new.detach() - b_target, b_target),
                     fallback=fallback)


def _solve(ws: list[torch.Tensor], groups: int, dk: torch.Tensor, k_target: torch.Tensor) -> _Solution:
    """The first candidate factor that reaches ``k_target``, else the candidate that gets closest."""
    candidates = _candidates(ws, groups, dk)
    if not candidates:  # every map too large to form: nothing is changed, the residual says how far it is
        return _Solution(len(ws) - 1, torch.zeros_like(ws[-1]), 0, _rel(dk, k_target))
    if not torch.any(dk):  # the chain already contracts to the target: the zero change of the preferred factor
        return _evaluate(ws, groups, dk, k_target, *candidates[0])
    solved: dict[int, _Solution] = {}
    for j, solver in candidates:
        if _may_reach(ws, groups, j, solver, dk):
            solved[j] = _evaluate(ws, groups, dk, k_target, j, solver)
            if solved[j].residual <= REACH_TOL:
                return solved[j]
    for j, solver in candidates:
        if j not in solved:
            solved[j] = _evaluate(ws, groups, dk, k_target, j, solver)
    return min(solved.values(), key=lambda s: s.residual)


def _candidates(ws: list[torch.Tensor], groups: int, dk: torch.Tensor) -> list[tuple[int, Callable]]:
    """(factor, solver) by preference: sandwiches nearest the middle, last, first, then the other middles.

    Solvers that form an explicit map are kept only when it has at most ``MAX_MAP_ENTRIES`` entries.
    """
    n = len(ws)
    is_1x1 = [tuple(w.shape[-2:]) == (1, 1) for w in ws]
    sandwich = [j for j in range(n) if all(is_1x1[:j]) and all(is_1x1[j + 1:])]
    out: list[tuple[int, Callable]] = [(j, _sandwich) for j in sorted(sandwich, key=lambda j: abs(2 * j - (n - 1)))]
    others = [(n - 1, _last), (0, _first)] + [(j, _explicit) for j in range(1, n - 1)]
    return out + [(j, f) for j, f in others if j not in sandwich and _map_entries(ws[j], f, groups, dk)
                  <= MAX_MAP_ENTRIES]


def _map_shape(w: torch.Tensor, solver: Callable, groups: int, dk: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of one block of an explicit map: kernel entries reached, factor entries varied."""
    n_g, m_g, s = dk.shape[0] // groups, dk.shape[1], dk.shape[-2] * dk.shape[-1]
    taps = w.shape[-2] * w.shape[-1]
    return {_last: (m_g * s, w.shape[1] * taps), _first: (n_g * s, w.shape[0] // groups * taps),
            _explicit: (n_g * m_g * s, w.numel() // groups)}[solver]


def _map_entries(w: torch.Tensor, solver: Callable, groups: int, dk: torch.Tensor) -> int:
    """Entries of the explicit maps and of the factor's basis (cols x cols), all groups together."""
    rows, cols = _map_shape(w, solver, groups, dk)
    return groups * cols * max(rows, cols)


def _may_reach(ws: list[torch.Tensor], groups: int, j: int, solver: Callable, dk: torch.Tensor) -> bool:
    """Cheap dimension test: a map with fewer unknowns than equations per block cannot reach every kernel."""
    if solver is _sandwich:
        return ws[j].shape[1] >= dk.shape[1] and ws[j].shape[0] >= dk.shape[0]
    rows, cols = _map_shape(ws[j], solver, groups, dk)
    return cols >= rows


def _evaluate(ws: list[torch.Tensor], groups: int, dk: torch.Tensor, k_target: torch.Tensor, j: int,
              solver: Callable) -> _Solution:
    delta, rank = solver(ws, groups, j, dk)
    trial = list(ws)
    trial[j] = ws[j] + delta
    k, _ = compose_chain(trial, [None] * len(trial), groups)
    return _Solution(j, delta, rank, _rel(k - k_target, k_target))


def _pinv(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched pseudo-inverse and numerical rank (singular values above ``max(rows, cols) * eps * s_max``)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    tol = s.amax(dim=-1, keepdim=True) * max(a.shape[-2:]) * torch.finfo(a.dtype).eps
    keep = s > tol
    inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    return vh.mT @ (inv[..., None] * u.mT), keep.sum(dim=-1)


def _eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _compose(ws: list[torch.Tensor], groups: int) -> torch.Tensor | None:
    """The kernel of a (sub)chain, or None for the empty chain (the identity)."""
    return compose_chain(ws, [None] * len(ws), groups)[0] if ws else None


def _sandwich(ws: list[torch.Tensor], groups: int, j: int, dk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``K_t = Q W_t P`` per group and tap with 1x1 ``P``, ``Q``: ``dW_t = pinv(Q) dK_t pinv(P)``."""
    g, w = groups, ws[j]
    n_g, m_g = dk.shape[0] // g, dk.shape[1]
    pre, post = _compose(ws[:j], g), _compose(ws[j + 1:], g)
    p = _eye(m_g, dk).expand(g, m_g, m_g) if pre is None else pre.reshape(g, -1, m_g)
    q = _eye(n_g, dk).expand(g, n_g, n_g) if post is None else post.reshape(g, n_g, -1)
    p_inv, p_rank = _pinv(p)
    q_inv, q_rank = _pinv(q)
    d = dk.reshape(g, n_g, m_g, -1)
    delta = torch.einsum("gqn,gnmt,gmp->gqpt", q_inv, d, p_inv).reshape(w.shape)
    return delta, int((p_rank * q_rank).sum()) * d.shape[-1]


def _last(ws: list[torch.Tensor], groups: int, j: int, dk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``K[o] = M W[o]`` for every output channel ``o`` of a group (``M``: the prefix composed with a basis)."""
    g, w = groups, ws[j]
    q_g, taps = w.shape[1], w.shape[-2] * w.shape[-1]
    n_g = dk.shape[0] // g
    basis = _eye(q_g * taps, w).reshape(q_g * taps, q_g, *w.shape[-2:]).repeat(g, 1, 1, 1)
    r = compose_pair(basis, _compose(ws[:j], g), g)  # (g * q_g * taps, m_g, kh, kw): M's columns
    m_inv, rank = _pinv(r.reshape(g, q_g * taps, -1).mT)
    dy = dk.reshape(g, n_g, -1).mT  # (g, m_g * kh * kw, n_g)
    delta = (m_inv @ dy).mT.reshape(w.shape)
    return delta, int(rank.sum()) * n_g


def _first(ws: list[torch.Tensor], groups: int, j: int, dk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``K[:, c] = N W[:, c]`` for every input channel ``c`` of a group (``N``: a basis composed with the suffix)."""
    g, w = groups, ws[j]
    p_g, m_g, taps = w.shape[0] // g, w.shape[1], w.shape[-2] * w.shape[-1]
    n_g, s = dk.shape[0] // g, dk.shape[-2] * dk.shape[-1]
    basis = _eye(p_g * taps, w).reshape(p_g * taps, p_g, *w.shape[-2:]).transpose(0, 1)
    r = compose_pair(_compose(ws[1:], g), basis.repeat(g, 1, 1, 1), g)  # (g * n_g, p_g * taps, kh, kw)
    n_map = r.reshape(g, n_g, p_g * taps, s).transpose(2, 3).reshape(g, n_g * s, p_g * taps)
    n_inv, rank = _pinv(n_map)
    dy = dk.reshape(g, n_g, m_g, s).transpose(2, 3).reshape(g, n_g * s, m_g)
    delta = (n_inv @ dy).reshape(g, p_g, taps, m_g).transpose(2, 3).reshape(w.shape)
    return delta, int(rank.sum()) * m_g


def _explicit(ws: list[torch.Tensor], groups: int, j: int, dk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A middle factor, per group through its explicit map: the prefix and suffix composed with a basis of it."""
    g, w = groups, ws[j]
    size = w.numel() // g
    basis = _eye(size, w).reshape(size * (w.shape[0] // g), *w.shape[1:])  # one factor per row
    maps = []
    for part in [[x.reshape(g, -1, *x.shape[1:])[gi] for x in ws] for gi in range(g)]:
        through = compose_pair(basis, _compose(part[:j], 1), 1)  # every basis factor after the prefix
        post = _compose(part[j + 1:], 1)
        k = compose_pair(post.repeat(size, 1, 1, 1), through, size)  # then the suffix, basis by basis
        maps.append(k.reshape(size, -1).mT)
    inv, rank = _pinv(torch.stack(maps))
    delta = (inv @ dk.reshape(g, -1, 1)).reshape(w.shape)
    return delta, int(rank.sum())
