"""DDP comm hooks of the Ray engine: exact byte counts per step through real DDP + gloo (no Ray).

A one-process gloo group runs the real hooks (allreduce, fp16/bf16 casts, PowerSGD factorisation, codec chains
through the allgather) on real buckets; the bytes a rank hands to allreduce do not depend on the world size,
and the multi-worker path is covered end to end by ``test_ray_e2e.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.transport.ddp_hooks import CommStats, expected_dense_bytes, parse_comm, register_comm_hook

STEPS = 3
ENTROPY = "qsgd(bits=3,block=256,rounding=nearest,entropy=deflate,scales=bf16)"
CASES = [("dense", "none"), ("dense", "fp16"), ("dense", "bf16"), ("dense", "powersgd(2)"), ("csg", "none"),
         ("csg", "bf16"), ("dense", "qsgd(bits=3,block=256,rounding=nearest)"), ("dense", ENTROPY)]


def _build(kind: str) -> torch.nn.Module:
    from pipeline.config import config_from_dict
    from pipeline.modeling import build_training_model

    comp = {"kind": "csg", "slice_shape": [16, 16, 3, 3], "code_size": 16} if kind == "csg" else {"kind": "none"}
    return build_training_model(config_from_dict({"model": {"name": "resnet20"}, "compression": comp}))


@pytest.fixture(scope="module")
def gloo_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a default torch.distributed process group already exists in this process")
    store = dist.FileStore(str(Path(tmp_path_factory.mktemp("gloo")) / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def hook_results(gloo_group: None) -> dict:
    results = {}
    gen = torch.Generator().manual_seed(0)
    for kind, spec in CASES:
        model = _build(kind)
        ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        stats = register_comm_hook(ddp, spec, powersgd_start_iter=2, error_feedback=spec.startswith("qsgd"))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        per_step = []
        for _ in range(STEPS):
            x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
            before = stats.bytes
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            per_step.append(stats.bytes - before)
        results[(kind, spec)] = {"per_step": per_step, "steps": stats.steps, "last": stats.last_step_bytes,
                                 "dense_bytes": expected_dense_bytes(model),
                                 "finite": all(torch.isfinite(p).all() for p in model.parameters())}
    return results


def test_parse_comm_accepts_the_four_kinds_and_names_the_field_on_errors() -> None:
    assert parse_comm("none") == ("none", None)
    assert parse_comm("powersgd(4)") == ("powersgd", 4)
    for bad in ("fp8", "powersgd(0)", "powersgd", "PowerSGD(2)"):
        with pytest.raises(ValueError, match="transport.comm"):
            parse_comm(bad)


def test_parse_comm_accepts_codec_chains() -> None:
    assert parse_comm("topk(frac=0.01)+qsgd(bits=8,block=256)") == ("codec", None)
    assert parse_comm("sign") == ("codec", None)
    with pytest.raises(ValueError, match="transport.comm: qsgd: bits"):
        parse_comm("qsgd(bits=9)")
    with pytest.raises(ValueError, match="buckets are flat: use powersgd"):
        parse_comm("lowrank(rank=2)+qsgd(bits=8)")


def test_codec_hook_state_round_trips_for_resume() -> None:
    from pipeline.transport.error_feedback import ErrorFeedback

    stats = CommStats("sign", steps=7, error_feedback=ErrorFeedback())
    stats.error_feedback.record("fc.weight", torch.ones(3), torch.zeros(3), round=6)
    back = CommStats("sign", error_feedback=ErrorFeedback())
    back.load_state_dict(stats.state_dict())
    assert back.steps == 7 and torch.equal(back.error_feedback.residuals["fc.weight"], torch.ones(3))
    with pytest.raises(ValueError, match="error feedback is off"):
        CommStats("sign").load_state_dict(stats.state_dict())


def test_register_needs_ddp() -> None:
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_comm_hook(torch.nn.Linear(2, 2), "none")
    assert CommStats("none").per_step() == 0.0


def test_uncompressed_bytes_per_step_equal_trainable_parameters_times_four(hook_results: dict) -> None:
    r = hook_results[("dense", "none")]
    assert r["steps"] == STEPS and r["finite"]
    assert r["per_step"] == [r["dense_bytes"]] * STEPS == [r["last"]] * STEPS


def test_half_precision_hooks_send_half_the_bytes(hook_results: dict) -> None:
    dense = hook_results[("dense", "none")]["per_step"][0]
    for spec in ("fp16", "bf16"):
        assert hook_results[("dense", spec)]["per_step"] == [dense // 2] * STEPS
        assert hook_results[("dense", spec)]["finite"]


def test_powersgd_warms_up_uncompressed_then_sends_low_rank_factors(hook_results: dict) -> None:
    r = hook_results[("dense", "powersgd(2)")]
    dense = hook_results[("dense", "none")]["per_step"][0]
    assert r["per_step"][:2] == [dense, dense]  # start_iter=2 plain allreduce steps
    assert 0 < r["per_step"][2] == r["last"] < dense / 5
    assert r["finite"]


def test_csg_allreduces_only_its_trainable_parameters(hook_results: dict) -> None:
    dense, csg = hook_results[("dense", "none")], hook_results[("csg", "none")]
    ratio = csg["per_step"][0] / dense["per_step"][0]
    param_ratio = csg["dense_bytes"] / dense["dense_bytes"]
    assert ratio < 0.5
    assert abs(ratio / param_ratio - 1) < 0.02
    assert hook_results[("csg", "bf16")]["per_step"][0] == csg["per_step"][0] // 2


def test_entropy_coded_gradients_travel_through_the_allgather_and_send_fewer_bytes(hook_results: dict) -> None:
    dense = hook_results[("dense", "none")]["per_step"][0]
    packed, coded = hook_results[("dense", "qsgd(bits=3,block=256,rounding=nearest)")], hook_results[("dense", ENTROPY)]
    assert coded["steps"] == STEPS and coded["finite"] and packed["finite"]
    # 3 bits packed are 3/32 of fp32 plus the fp32 scales; deflate + bf16 scales must undercut that every step
    assert all(p < 0.11 * dense for p in packed["per_step"])
    assert all(c < p for c, p in zip(coded["per_step"], packed["per_step"], strict=True))
