"""Compact-size gradient sync of fused ExpandNets with 2 real gloo processes (torch.multiprocessing, no Ray).

Both ranks train on different data for a few SGD steps (momentum, weight decay). With comm ``none`` the
factors must equal those of ordinary DDP (factor gradients in DDP's buckets) to float tolerance, while the
bytes per step are the compact net's (compact parameter count x 4), counted by the DDP hook plus the sync.
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import models

WORLD, STEPS = 2, 4
pytestmark = pytest.mark.slow


def make_model(mode: str = "fused") -> nn.Module:
    """A small net with every expanded kind the sync meets: CL convs (with bias), an FC chain, BN, a classifier."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5))
    return models.expand(net, "cl+fc", rate=2, mode=mode)


def _train(rank: int, model: nn.Module, spec: str, compact: bool) -> dict:
    from pipeline.transport.compact_sync import CompactGradSync
    from pipeline.transport.ddp_hooks import register_comm_hook

    sync = CompactGradSync(model, spec) if compact else None
    if sync is not None:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sync.factor_names())
        sync.broadcast_factors()
    ddp = nn.parallel.DistributedDataParallel(model)
    stats = register_comm_hook(ddp, spec)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(STEPS):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    synced = sync.stats if sync is not None else None
    if sync is not None:  # a deep copy composes from its own factors and joins no collective
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(2)
        twin(torch.randn(2, 3, 8, 8)).sum().backward()
        assert synced.calls == STEPS * len(sync.layers)
        assert not torch.equal(twin[0].composed()[0], model[0].composed()[0])
        sync.remove()
        assert "composed" not in vars(model[0])
    return {"state": {k: v.tolist() for k, v in model.named_parameters()},  # BN buffers differ per rank
            "ddp_last": stats.last_step_bytes, "ddp_steps": stats.steps,
            "sync_last": synced.last_step_bytes if synced else 0, "sync_steps": synced.steps if synced else 0,
            "sync_bytes": synced.bytes if synced else 0}


def _worker(rank: int, port: int, out: str) -> None:
    from pipeline.transport.compact_sync import CompactGradSync

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        model = make_model()
        results = {"factors": _train(rank, copy.deepcopy(model), "none", compact=False),
                   "compact": _train(rank, copy.deepcopy(model), "none", compact=True),
                   "fp16": _train(rank, copy.deepcopy(model), "fp16", compact=True),
                   "codec": _train(rank, copy.deepcopy(model), "qsgd(bits=8,block=64)", compact=True)}
        for bad, spec in ((make_model("explicit"), "none"), (copy.deepcopy(model), "powersgd(2)")):
            try:
                CompactGradSync(bad, spec)
                results.setdefault("accepted", []).append(spec)
            except ValueError as exc:
                results.setdefault("refused", []).append(str(exc))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("compact_sync")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        x, y = torch.tensor(a[k], dtype=torch.float64), torch.tensor(b[k], dtype=torch.float64)
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


def test_compact_sync_gives_ordinary_ddp_factors(ranks: list[dict]) -> None:
    init = {k: v.tolist() for k, v in make_model().named_parameters()}
    for r in ranks:
        assert _max_rel_diff(r["compact"]["state"], r["factors"]["state"]) < 1e-5
        assert _max_rel_diff(r["compact"]["state"], init) > 1e-2  # the steps did move the factors
    assert ranks[0]["compact"]["state"] == ranks[1]["compact"]["state"]  # bitwise identical across ranks


def test_bytes_per_step_are_the_compact_nets(ranks: list[dict]) -> None:
    from pipeline.transport.compact_sync import compact_param_count
    from pipeline.transport.ddp_hooks import expected_dense_bytes

    model = make_model()
    compact = models.count_params(models.contract(model))
    assert compact_param_count(model) == compact
    for r in ranks:
        exact, half = r["compact"], r["fp16"]
        assert exact["ddp_steps"] == exact["sync_steps"] == STEPS
        assert exact["ddp_last"] + exact["sync_last"] == compact * 4
        assert exact["sync_bytes"] == STEPS * exact["sync_last"]
        assert half["ddp_last"] + half["sync_last"] == compact * 2
        assert r["factors"]["ddp_last"] == expected_dense_bytes(model) > 2 * compact * 4


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([torch.tensor(v, dtype=torch.float64).reshape(-1) for v in state.values()])


def test_compressed_sync_keeps_ranks_identical_and_close(ranks: list[dict]) -> None:
    init, exact = _flat({k: v.tolist() for k, v in make_model().named_parameters()}), ranks[0]["factors"]["state"]
    for kind in ("fp16", "codec"):
        assert ranks[0][kind]["state"] == ranks[1][kind]["state"]
        off = (_flat(ranks[0][kind]["state"]) - _flat(exact)).norm() / (_flat(exact) - init).norm()
        assert 0 < off < 0.1, kind  # a compressed approximation of the exact update, not the exact one
    codec = ranks[0]["codec"]
    assert codec["sync_steps"] == STEPS and 0 < codec["sync_last"] < (models.count_params(
        models.contract(make_model())) * 4) / 2  # 8-bit payloads + scales + length words


def test_explicit_mode_and_powersgd_are_refused(ranks: list[dict]) -> None:
    assert "accepted" not in ranks[0]
    explicit, powersgd = ranks[0]["refused"]
    assert "explicit" in explicit and "expand_sync: factors" in explicit
    assert "powersgd(2)" in powersgd
