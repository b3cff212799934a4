"""The timing benchmarks' shared machinery: load gate, interleaving, ratio statistics, and the GPU path
(autocast bfloat16 + channels_last) exercised on CPU with tiny batches."""

from __future__ import annotations

import argparse

import pytest
import torch

import models
from benchmarks import bench_common
from benchmarks.bench_common import (
    StepOptions,
    TrainStep,
    load_gate,
    ratio_to,
    record_gate,
    time_interleaved,
)


def test_load_gate_refuses_above_limit_unless_forced(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setattr(bench_common.os, "getloadavg", lambda: (3.2, 2.0, 1.0))
    with pytest.raises(SystemExit) as exc:
        load_gate(1.5, force=False)
    assert exc.value.code == 3
    assert "refusing to measure" in capsys.readouterr().err
    banner = load_gate(1.5, force=True)
    assert "FORCED" in banner and "3.20" in banner and banner in capsys.readouterr().out
    monkeypatch.setattr(bench_common.os, "getloadavg", lambda: (0.4, 0.5, 0.6))
    assert load_gate(1.5, force=False) == ""
    assert "load average 0.40" in capsys.readouterr().out
    args = argparse.Namespace(max_load=1.5, force=False, repeats=2)
    assert "NOT A RECORD" in record_gate(args)
    args.repeats = 3
    assert record_gate(args) == ""


def test_interleaving_and_ratio_statistics() -> None:
    order: list[str] = []
    times = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                             repeats=3, steps_per_repeat=2, warmup=1)
    assert order == ["a", "b"] * 7
    assert [len(r) for r in times["a"]] == [2, 2, 2]
    r = ratio_to([[2.0, 2.2], [3.0, 3.0], [2.0, 2.0]], [[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    assert r.ratio == pytest.approx(2.0) and r.ratio_min == pytest.approx(1.5) and r.ratio_max == pytest.approx(2.1)
    assert r.step_s == pytest.approx(2.1)
    with pytest.raises(ValueError, match="at least one repeat"):
        time_interleaved({"a": lambda: None}, repeats=0, steps_per_repeat=1, warmup=0)


@pytest.mark.parametrize("strategy", ["ck+fc", "csg"])
def test_amp_channels_last_step_trains_reparameterized_nets_on_cpu(strategy: str) -> None:
    base = models.build("smallnet7")
    if strategy == "csg":
        net = models.csg_compress(base, slice_shape=(8, 8, 7, 7), code_size=8)
        factor = net.csg_generator.weight
    else:
        net = models.expand(base, strategy, rate=2)
        factor = net.stages[1][0].chain[0].weight
    before = factor.detach().clone()
    step = TrainStep(net, StepOptions("cpu", batch=2, amp=True, channels_last=True))
    step()
    assert not torch.equal(before, factor.detach())  # the bfloat16 forward trained the float32 factors
    assert factor.dtype == torch.float32
    conv_weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4]
    assert any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in conv_weights)


def test_memory_counts_training_state_and_step_growth() -> None:
    from benchmarks.expand_speed import measure_memory

    compact = measure_memory("smallnet7", "compact", StepOptions("cpu", batch=2))
    fused = measure_memory("smallnet7", "ck+fc-fused", StepOptions("cpu", batch=2))
    # parameters, gradients and momentum alone: 3 x 4 bytes per parameter
    assert compact["peak_bytes"] >= 12 * compact["params"] and fused["peak_bytes"] >= 12 * fused["params"]
    assert fused["peak_bytes"] > compact["peak_bytes"] and compact["saved_bytes"] > 0
