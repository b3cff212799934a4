"""The codec DDP hook of the Ray engine with 2 real processes over gloo (torch.multiprocessing, no Ray).

Each rank trains on different data; after every step the gradient DDP leaves in the model must equal the
mean of the decoded payloads of both ranks (recorded where they cross the collective), both ranks must hold
the same gradient, and the bytes the hook counts must equal this rank's encoded payload plus its length word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 3


def _run(rank: int, model: nn.Module, spec: str, bucket_cap_mb: float, gathered: list) -> dict:
    """Train ``STEPS`` steps under the codec hook; check each step's gradients against the payloads."""
    from pipeline.transport.codecs import parse_chain
    from pipeline.transport.ddp_hooks import register_comm_hook

    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    stats = register_comm_hook(ddp, spec, seed=11, error_feedback=True)
    chain = parse_chain(spec)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    expected_bytes, buckets = 0, set()
    for _ in range(STEPS):
        gathered.clear()
        x = torch.randn(16, 3, 8, 8, generator=gen)
        loss = ddp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        checked = 0
        for payloads, shape, params in gathered:
            mean = sum(chain.decode(chain.from_bytes(p, shape)) for p in payloads) / WORLD
            offset = 0
            for param in params:  # the bucket's flat layout: its parameters in bucket order
                piece = mean[offset:offset + param.numel()].view_as(param)
                assert torch.equal(piece, param.grad), "gradient differs from the mean of the decoded payloads"
                offset += param.numel()
            assert offset == shape[0]
            own = payloads[rank]
            enc = chain.from_bytes(own, shape)
            prefix = 4 if "indices" in enc.parts else 0
            assert own.numel() == enc.nbytes + prefix
            expected_bytes += own.numel() + 8
            checked += offset
        assert checked == grads.numel()
        same = grads.clone()
        dist.broadcast(same, src=0)
        assert torch.equal(same, grads), "ranks disagree on the averaged gradient"
        buckets.add(len(gathered))
        opt.step()
    assert stats.bytes == expected_bytes and stats.steps == STEPS
    return {"bytes": stats.bytes, "last_step_bytes": stats.last_step_bytes, "buckets": sorted(buckets),
            "residuals": sorted(stats.error_feedback.residuals), "numel": sum(p.numel() for p in model.parameters()),
            "params": sorted(n for n, _ in model.named_parameters())}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    import os

    import pipeline.transport.ddp_hooks as hooks

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on loopback, whatever the hostname resolves to
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    gathered: list = []
    original = hooks._gather_payloads

    def recording(payload: torch.Tensor, group) -> list[torch.Tensor]:
        out = original(payload, group)
        gathered.append(([p.clone() for p in out], None, None))
        return out

    hooks._gather_payloads = recording
    original_hook = hooks._codec_hook

    def hook_with_shape(state, bucket):  # record the bucket's layout beside its payloads
        fut = original_hook(state, bucket)
        payloads, _, _ = gathered[-1]
        gathered[-1] = (payloads, (bucket.buffer().numel(),), bucket.parameters())
        return fut

    hooks._codec_hook = hook_with_shape
    results = {}
    try:
        torch.manual_seed(0)  # identical initial weights on both ranks
        single = nn.Sequential(nn.Flatten(), nn.Linear(192, 16, bias=False))
        results["single"] = _run(rank, single, "topk(frac=0.05)+qsgd(bits=4,block=64)", 25.0, gathered)
        torch.manual_seed(0)
        convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                                nn.Linear(8 * 4 * 4, 10))
        results["buckets"] = _run(rank, convnet, "sign", 0.001, gathered)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_codec_hook_averages_decoded_payloads_and_counts_their_bytes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single, buckets = ranks[0]["single"], ranks[0]["buckets"]
    assert single["buckets"] == [1] and single["residuals"] == single["params"] == ["1.weight"]
    # 5% of 3072 values at 4 bits + 3 scales + indices: far below the 12,288 dense fp32 bytes
    assert single["last_step_bytes"] < 0.1 * 4 * single["numel"]
    assert buckets["buckets"][-1] > 1  # DDP re-buckets after the first step; residuals are kept per parameter
    assert buckets["residuals"] == buckets["params"] and len(buckets["params"]) == 6
    # sign: one bit per element, one fp32 scale and an 8-byte length word per bucket
    nb = buckets["buckets"][-1]
    assert buckets["last_step_bytes"] <= buckets["numel"] / 8 + nb * (4 + 8 + 1)
    for r in ranks[1:]:
        assert r["single"]["bytes"] > 0 and r["buckets"]["buckets"] == buckets["buckets"]
