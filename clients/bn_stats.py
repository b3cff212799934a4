"""BatchNorm running statistics pooled across data-parallel ranks (Ray workers train on different shards).

DDP averages gradients but not BN buffers (the Ray worker runs DDP with ``forward_sync_buffers=False``), so
after an epoch every rank holds statistics of its own shard only. :func:`pool_bn_statistics` replaces them,
on every rank, by the statistics of the union of the shards: with ``n_r`` samples, mean ``mu_r`` and
variance ``var_r`` on rank r (N = sum n_r),

    mu  = sum_r n_r mu_r / N
    var = sum_r n_r var_r / N + sum_r n_r (mu_r - mu)^2 / N      (not the mean of the variances)

(equal shards: mean(var_r) + mean((mu_r - mu)^2)). The Ray worker calls it before each evaluation, checkpoint
and so before the final model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics, in module order (the same on every rank)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None and m.running_var is not None]


@torch.no_grad()
def pool_bn_statistics(model: nn.Module, samples: int, group: dist.ProcessGroup | None = None) -> int:
    """Replace every rank's BN running mean/variance by the pooled statistics (weights: ``samples`` per rank).

    One all-reduce of ``[n, n*mu, n*(var + mu^2)]`` for all layers, in float64. Returns the number of layers
    pooled (0 and nothing changes when torch.distributed is not initialised or the world has one rank).
    """
    layers = bn_layers(model)
    if not layers or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return 0
    if samples < 0:
        raise ValueError(f"pool_bn_statistics: samples must be >= 0, got {samples}")
    device = layers[0].running_mean.device
    n = float(samples)
    parts = [torch.tensor([n], dtype=torch.float64, device=device)]
    for bn in layers:
        mu, var = bn.running_mean.double(), bn.running_var.double()
        parts += [n * mu, n * (var + mu * mu)]
    flat = torch.cat(parts)
    dist.all_reduce(flat, group=group)
    total = flat[0].item()
    if total <= 0:
        raise ValueError("pool_bn_statistics: no rank reported any samples")
    offset = 1
    for bn in layers:
        c = bn.running_mean.numel()
        mean = flat[offset:offset + c] / total
        second = flat[offset + c:offset + 2 * c] / total
        offset += 2 * c
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_((second - mean * mean).clamp_min(0).to(bn.running_var.dtype))
    return len(layers)
