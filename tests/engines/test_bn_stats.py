"""Ray's BN pooling without Ray: two gloo processes (torch.multiprocessing) on different data vs the union."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from clients.bn_stats import pool_bn_statistics

# rank r holds SIZES[r] samples around MEANS[r] with spread SCALES[r]: very different shards
SIZES, MEANS, SCALES = (4000, 6000), (0.0, 3.0), (1.0, 0.5)


def shard(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rank)
    return MEANS[rank] + SCALES[rank] * torch.randn(SIZES[rank], 4, 5, 5, generator=gen)


def bn_after_one_pass(x: torch.Tensor) -> nn.BatchNorm2d:
    """A BN layer whose running statistics are exactly x's (momentum 1: one batch replaces the defaults)."""
    bn = nn.BatchNorm2d(4, momentum=1.0)
    bn.train()(x)
    return bn


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = nn.Sequential(bn_after_one_pass(shard(rank)))
        assert pool_bn_statistics(model, SIZES[rank]) == 1
        torch.save({k: v for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pooled_bn_statistics_equal_those_of_the_union_of_the_shards(tmp_path: Path) -> None:
    # fork: the children reuse the imported torch (spawn would re-import it: ~10 s more on a busy box)
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    union = torch.cat([shard(0), shard(1)])
    mean, var = union.mean((0, 2, 3)), union.var((0, 2, 3), unbiased=False)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for st in states:  # every rank now holds the same, pooled statistics
        torch.testing.assert_close(st["0.running_mean"], mean, rtol=0, atol=1e-5)
        # running_var is unbiased per shard (n/(n-1)); pooled over 10k samples the bias is < 3e-4 relative
        torch.testing.assert_close(st["0.running_var"], var, rtol=1e-3, atol=0)
    mean_of_vars = sum(SIZES[r] * bn_after_one_pass(shard(r)).running_var for r in range(2)) / sum(SIZES)
    assert (mean_of_vars - var).abs().min() > 1.0  # the naive average misses the spread of the shard means


def test_pooling_is_a_no_op_outside_torch_distributed() -> None:
    bn = bn_after_one_pass(shard(0))
    before = bn.running_var.clone()
    assert pool_bn_statistics(nn.Sequential(bn), SIZES[0]) == 0
    assert torch.equal(bn.running_var, before)
