"""Chain algebra of ExpandNets: the one convolution (or matrix) equal to a chain of linear layers.

All functions are pure tensor maths, differentiable, and work in the dtype of their inputs (the fused
training path runs them in float32 on every forward; contraction for deployment runs them in float64).

Conventions: weights are in ``nn.Conv2d`` layout ``(out, in / groups, kh, kw)``; a ``nn.Linear`` weight is
the 1x1 case with ``groups=1``. Every layer of a chain is a stride-1, unpadded ("valid") cross-correlation
with the same ``groups``; the caller applies the original padding and stride to the composed kernel. That is
exact when padding sits only on the first chain layer and the stride on the last non-1x1 layer (see
``models/expand_layers.py``), because every intermediate pixel, border included, is then an affine function
of the zero-padded input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _split_groups(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``(out, in_g, kh, kw)`` -> ``(groups, out_g, in_g, kh, kw)``."""
    return w.reshape(groups, w.shape[0] // groups, *w.shape[1:])


def compose_pair(w_next: torch.Tensor, k_prev: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Kernel of ``k_prev`` followed by ``w_next`` (both valid, stride 1, same ``groups``).

    The composed kernel has spatial size ``(a + c - 1, b + d - 1)``. A 1x1 factor on either side reduces to
    a (grouped) matrix product; otherwise the full 2-D convolution of the two kernels is one
    ``conv_transpose2d`` call in which ``w_next`` plays the batch of inputs and ``k_prev`` the weight.
    """
    if w_next.shape[1] * groups != k_prev.shape[0]:
        raise ValueError(
            f"chain layers do not fit: next layer reads {w_next.shape[1] * groups} channels, "
            f"previous one writes {k_prev.shape[0]}"
        )
    g = groups
    out_ch, in_g = w_next.shape[0], k_prev.shape[1]
    if w_next.shape[-2:] == (1, 1):  # out[g,o,c,ij] = sum_q W[g,o,q] K[g,q,c,ij]: one (batched) matmul, no copies
        k = _group_matmul(w_next.reshape(g, out_ch // g, -1), k_prev.reshape(g, k_prev.shape[0] // g, -1))
        return k.reshape(out_ch, in_g, *k_prev.shape[-2:])
    if k_prev.shape[-2:] == (1, 1):
        return _compose_after_pointwise(w_next, k_prev, g)
    # conv_transpose2d(input (B, g*Qg, a, b), weight (g*Qg, Cg, c, d), groups=g) -> (B, g*Cg, a+c-1, b+d-1):
    # out[o, c] = sum_q full_conv(w_next[o, q], k_prev[q, c]) within each group; batch B = out_ch / g.
    og, qg, a, b = out_ch // g, w_next.shape[1], w_next.shape[2], w_next.shape[3]
    inp = w_next.reshape(g, og, qg, a, b).transpose(0, 1).reshape(og, g * qg, a, b)
    k = F.conv_transpose2d(inp, k_prev, groups=g)
    return k.reshape(og, g, in_g, *k.shape[-2:]).transpose(0, 1).reshape(out_ch, in_g, *k.shape[-2:])


def _group_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` per group for ``(g, m, k) @ (g, k, n)``: a plain GEMM when ``g == 1``."""
    return torch.mm(a.squeeze(0), b.squeeze(0)).unsqueeze(0) if a.shape[0] == 1 else torch.bmm(a, b)


def _compose_after_pointwise(w_next: torch.Tensor, k_prev: torch.Tensor, g: int) -> torch.Tensor:
    """``out[g,o,c,s] = sum_q W[g,o,q,s] A[g,q,c]``: a kxk layer after a 1x1 one.

    W's tap axis sits between the contracted axis and the next filter. With many taps (7x7) a product per
    filter ``A^T @ W[g,o]`` (q x taps) reads W in place and is fastest. With few taps (3x3) those products are
    thousands of tiny matmuls (and, on CPU, a per-batch copy loop forward and backward), several times slower
    in CPU time on ResNet shapes than copying W into GEMM layout for ONE GEMM per group and permuting the
    result back; the GEMM's long side goes where it is fastest: ``(o*s) x q @ q x c`` for wide ``c``, else
    ``c x q @ q x (o*s)``.
    """
    out_ch, q_g, kh, kw = w_next.shape
    o_g, c, taps = out_ch // g, k_prev.shape[1], kh * kw
    a = k_prev.reshape(g, q_g, c)
    w = w_next.reshape(g, o_g, q_g, taps)
    if taps > 9:  # 7x7: per-filter products measured ~10 % less CPU time than the copies + GEMM
        k = torch.matmul(a.transpose(1, 2).unsqueeze(1), w)  # (g, o, c, taps); W is not copied
        return k.reshape(out_ch, c, kh, kw)
    if c >= 32:
        k = _group_matmul(w.transpose(2, 3).reshape(g, o_g * taps, q_g), a)  # (g, o*s, c)
        return k.reshape(g, o_g, taps, c).transpose(2, 3).reshape(out_ch, c, kh, kw)
    k = _group_matmul(a.transpose(1, 2), w.transpose(1, 2).reshape(g, q_g, o_g * taps))  # (g, c, o*s)
    return k.reshape(g, c, o_g, taps).transpose(1, 2).reshape(out_ch, c, kh, kw)


def propagate_bias(w: torch.Tensor, b_prev: torch.Tensor | None, b: torch.Tensor | None,
                   groups: int = 1) -> torch.Tensor | None:
    """Bias after a layer with weight ``w`` and bias ``b`` that reads a constant-per-channel ``b_prev``.

    A valid convolution of a constant map ``b_prev`` is constant: ``W.sum(spatial) @ b_prev`` per group.
    ``None`` means zero; the result is ``None`` only when both biases are ``None``.
    """
    if b_prev is None:
        return b
    g = groups
    m = _split_groups(w.sum(dim=(2, 3)) if w.dim() == 4 else w, g)  # (g, out_g, in_g)
    out = torch.matmul(m, b_prev.reshape(g, -1, 1)).reshape(-1)
    return out if b is None else out + b


Plan = int | tuple["Plan", "Plan"]


def chain_plan(shapes: Sequence[Sequence[int]], groups: int = 1) -> Plan:
    """Cheapest order to compose a chain (matrix-chain DP on multiply counts); a leaf is a layer index.

    ``shapes`` are conv weight shapes ``(out, in / groups, kh, kw)`` (or ``(out, in)``), first layer first.
    E.g. an FC chain 512 -> 2048 -> 256 -> 64 costs 100M MACs as ``(W3 W2) W1`` but 276M as ``W3 (W2 W1)``.
    """
    dims = [(s[0], s[1] * groups, s[2] if len(s) > 2 else 1, s[3] if len(s) > 3 else 1) for s in shapes]
    n = len(dims)

    def size(i: int, j: int) -> tuple[int, int]:  # spatial size of the kernel composed from layers i..j
        return (sum(d[2] for d in dims[i:j + 1]) - (j - i), sum(d[3] for d in dims[i:j + 1]) - (j - i))

    cost = [[0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            best = None
            for k in range(i, j):
                (ah, aw), (bh, bw) = size(k + 1, j), size(i, k)
                c = cost[i][k] + cost[k + 1][j] + dims[j][0] * dims[k][0] * dims[i][1] * ah * aw * bh * bw
                if best is None or c < best:
                    best, split[i][j] = c, k
            cost[i][j] = best

    def build(i: int, j: int) -> Plan:
        return i if i == j else (build(i, split[i][j]), build(split[i][j] + 1, j))

    return build(0, n - 1)


def compose_chain(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], groups: int = 1,
                  plan: Plan | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(kernel, bias)`` of a chain of valid stride-1 convolutions (first layer first).

    Linear layers are passed as 2-D weights and come back as a 2-D matrix (the product ``W_l ... W_1``).
    Any bias may be ``None`` (zero); the composed bias is ``None`` only if all of them are. ``plan`` (from
    :func:`chain_plan`, computed here when omitted) fixes the composition order; the result does not depend
    on it beyond rounding.
    """
    if not weights or len(weights) != len(biases):
        raise ValueError(f"compose_chain needs one bias per weight, got {len(weights)} weights, {len(biases)} biases")
    linear = weights[0].dim() == 2
    ws = [w[:, :, None, None] if w.dim() == 2 else w for w in weights]
    if plan is None:
        plan = chain_plan([w.shape for w in ws], groups)

    def compose(node: Plan) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(node, int):
            return ws[node], biases[node]
        (k_first, b_first), (k_then, b_then) = compose(node[0]), compose(node[1])
        return compose_pair(k_then, k_first, groups), propagate_bias(k_then, b_first, b_then, groups)

    kernel, bias = compose(plan)
    return (kernel[:, :, 0, 0] if linear else kernel), bias
