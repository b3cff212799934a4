"""Flower apps without Ray: config transport, reply validation, byte accounting, strategies, checkpoints and resume.

Full server runs go through :class:`server.local_grid.LocalGrid` (the real ServerApp body and the real
ClientApp, in-process); the Ray simulation itself is covered by ``tests/engines/test_flower_sim.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import tomli
import torch
from flwr.app import MetricRecord, RecordDict

import models
from clients.app import app as client_app
from clients.flower_client import client_seed, proximal_penalty
from pipeline.checkpoint import (
    ResumeError,
    ServerCheckpoint,
    capture_rng,
    latest_round_checkpoint,
    list_round_checkpoints,
    restore_rng,
    save_round_checkpoint,
)
from pipeline.config import ConfigError, config_from_dict
from pipeline.modeling import build_training_model
from pipeline.transport.wire import (
    config_from_json,
    config_to_json,
    encode_state,
    record_nbytes,
)
from server.app import config_from_run_config
from server.local_grid import LocalGrid
from server.runner import run_server
from server.strategies import TooFewReplies, build_strategy
from server.validation import check_reply, expected_layout
from tests.fault_injection import corrupt_state, faulty_client_app

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path, transport_dtype: str = "fp32", **engine) -> dict:
    """A 3-client SmallNet-3 run on a slice of the embedded CIFAR-10 subset (seconds per round)."""
    return {
        "name": "fl", "seed": 3, "device": "cpu", "output": str(tmp_path),
        "data": {"train_limit": 192, "test_limit": 64, "augment": True, "partition": {"kind": "iid"}},
        "model": {"name": "smallnet3"},
        "engine": {"kind": "flower", "rounds": 2, "clients": 3, "min_train_nodes": 1, **engine},
        "transport": {"dtype": transport_dtype},
        "train": {"batch_size": 32, "lr": 0.05, "max_batches": 2, "eval_batch_size": 64},
    }


def run_local(raw: dict, app=client_app) -> dict:
    """Run the ServerApp body against the real ClientApp (or ``app``) in-process; returns the run summary."""
    cfg = config_from_dict(raw)
    return run_server(LocalGrid(app, cfg.engine.clients), cfg, cfg.run_dir)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(run_dir) / "model.safetensors"))


def test_config_travels_as_json_unchanged(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(tmp_path, transport_dtype="bf16"))
    assert config_from_json(config_to_json(cfg)) == cfg


# ------------------------------------------------------------------------------------------ validation
def _reply(state: dict[str, torch.Tensor], dtype: str = "fp32", n: int = 10) -> RecordDict:
    return RecordDict({"arrays": encode_state(state, dtype), "metrics": MetricRecord({"num-examples": n})})


def test_validation_accepts_good_replies_and_names_each_fault() -> None:
    state = models.trainable_state(models.build("smallnet3", num_classes=10))
    layout = expected_layout(state, "bf16")
    decoded, reason = check_reply(_reply(state, "bf16"), layout)
    assert reason is None and set(decoded) == set(state)
    first = next(iter(state))
    cases = {
        "non-finite": corrupt_state(state, "nan"),
        "shape": corrupt_state(state, "shape"),
        "missing key": {k: v for k, v in state.items() if k != first},
        "unexpected key": {**state, "extra.weight": torch.zeros(2)},
    }
    for expected, bad in cases.items():
        _, reason = check_reply(_reply(bad, "bf16"), layout)
        assert reason is not None and expected in reason, (expected, reason)
    _, reason = check_reply(_reply(state, "fp32"), layout)
    assert "dtype float32, expected bfloat16" in reason
    _, reason = check_reply(_reply(state, "bf16", n=0), layout)
    assert "num-examples" in reason
    inf_state = dict(state)
    inf_state[first] = torch.full_like(state[first], math.inf)
    assert "non-finite" in check_reply(_reply(inf_state, "bf16"), layout)[1]


# ------------------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum"])
def test_every_configured_strategy_is_flowers_own_class(tmp_path: Path, name: str) -> None:
    from flwr.serverapp import strategy as flwr_strategies

    cfg = config_from_dict(tiny_config(tmp_path, strategy=name, clients=4))
    strategy = build_strategy(cfg)
    flower_class = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam", "fedmedian": "FedMedian",
                    "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum"}[name]
    assert isinstance(strategy, getattr(flwr_strategies, flower_class))


def test_proximal_penalty_is_zero_at_the_global_weights_and_grows_away() -> None:
    model = models.build("smallnet3", num_classes=10)
    penalty = proximal_penalty(model, mu=0.5)
    assert penalty(model).item() == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert penalty(model).item() == pytest.approx(0.25 * next(model.parameters()).numel())


def test_client_seeds_differ_per_round_and_partition() -> None:
    seeds = {client_seed(0, r, p) for r in range(1, 4) for p in range(4)}
    assert len(seeds) == 12


# ----------------------------------------------------------------------------- server runs (in-process)
def test_faulty_clients_are_dropped_bytes_match_payloads_and_clients_evaluate(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, clients=4, rounds=1, transport_dtype="bf16", evaluate_fraction=1.0)
    raw["compression"] = {"kind": "csg", "slice_shape": [8, 8, 3, 3], "code_size": 8}
    summary = run_local(raw, faulty_client_app({1: "raise", 2: "nan", 3: "shape"}))
    record = json.loads((tmp_path / "fl" / "metrics.json").read_text())["history"][0]
    assert (record["replies_ok"], record["replies_failed"], record["replies_dropped"]) == (1, 1, 2)
    cfg = config_from_dict(raw)
    state = models.trainable_state(build_training_model(cfg))
    payload = record_nbytes(encode_state(state, "bf16"))
    wrong_shape = record_nbytes(encode_state(corrupt_state(state, "shape"), "bf16"))
    assert record["bytes_down"] == 8 * payload  # train + federated-evaluate messages to all 4 nodes
    # the evaluate shards cover the test set once: their weighted accuracy is the centralised one
    assert record["federated_test_accuracy"] == pytest.approx(record["test_accuracy"])
    assert record["bytes_up"] == 2 * payload + wrong_shape  # good + NaN (same size) + wrong shape; none from raise
    assert summary["bytes_up"] == record["bytes_up"] and summary["bytes_down"] == record["bytes_down"]
    assert not models.has_reparameterized(models.build_from_spec(
        json.loads((tmp_path / "fl" / "model.json").read_text())["spec"]))
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["finalize_max_abs_diff"] < 1e-4


def test_too_few_valid_replies_stop_the_run_with_a_clear_message(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, clients=2, rounds=1, min_train_nodes=2)
    expected = r"round 1: only 1 valid replies \(1 failed, 0 dropped\).*min_train_nodes=2"
    with pytest.raises(TooFewReplies, match=expected):
        run_local(raw, faulty_client_app({0: "raise"}))


def test_kill_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """FedAdam (server moments must be checkpointed), expand CL: 2 rounds straight == 1 round + resume."""
    def raw_for(name: str, rounds: int, resume: bool) -> dict:
        raw = tiny_config(tmp_path, strategy="fedadam", rounds=rounds, server_lr=0.01)
        raw["compression"] = {"kind": "expand", "strategy": "cl", "rate": 2}
        return {**raw, "name": name, "resume": resume}

    straight = run_local(raw_for("straight", 2, False))
    run_local(raw_for("killed", 1, False))
    ckpts = list_round_checkpoints(tmp_path / "killed" / "checkpoints")
    assert [p.name for p in ckpts] == ["round-0001.safetensors"]
    assert any(k.startswith("m_t/") for k in latest_round_checkpoint(ckpts[0].parent).strategy_state)
    resumed = run_local(raw_for("killed", 2, True))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    assert resumed["bytes_up"] == straight["bytes_up"] and resumed["steps"] == 2


# ------------------------------------------------------------------------------------------ checkpoint
def test_checkpoint_round_trip_restores_rng_and_refuses_another_config(tmp_path: Path) -> None:
    import random

    cfg = config_from_dict(tiny_config(tmp_path))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    rng = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = {"w": torch.randn(3, 2)}
    for rnd in (1, 2, 3):
        save_round_checkpoint(tmp_path / "ck", ServerCheckpoint(rnd, state, {"m_t/w": np.ones((3, 2), np.float32)},
                                                          [{"round": rnd}], rng), cfg)
    assert [p.name for p in list_round_checkpoints(tmp_path / "ck")] == ["round-0002.safetensors",
                                                                         "round-0003.safetensors"]
    ckpt = latest_round_checkpoint(tmp_path / "ck", cfg)
    assert ckpt.round == 3 and ckpt.history[-1] == {"round": 3} and torch.equal(ckpt.global_state["w"], state["w"])
    assert ckpt.strategy_state["m_t/w"].dtype == np.float32
    restore_rng(ckpt.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    other = config_from_dict({**tiny_config(tmp_path), "model": {"name": "smallnet7"}})
    with pytest.raises(ResumeError, match="different model.name"):
        latest_round_checkpoint(tmp_path / "ck", other)
    assert ckpt.run_key is None  # written without a run key (as before run keys existed)


def test_a_fresh_runs_round_checkpoint_removes_later_rounds_and_carries_its_run_key(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(tmp_path))
    for rnd in (4, 5):  # an earlier run of the same name, further along
        save_round_checkpoint(tmp_path / "ck", ServerCheckpoint(rnd, {"w": torch.zeros(2)}, {}, [], capture_rng(),
                                                                run_key="a" * 32), cfg)
    save_round_checkpoint(tmp_path / "ck", ServerCheckpoint(1, {"w": torch.ones(2)}, {}, [], capture_rng(),
                                                            run_key="b" * 32), cfg)
    assert [p.name for p in list_round_checkpoints(tmp_path / "ck")] == ["round-0001.safetensors"]
    ckpt = latest_round_checkpoint(tmp_path / "ck", cfg)
    assert (ckpt.round, ckpt.run_key) == (1, "b" * 32) and torch.equal(ckpt.global_state["w"], torch.ones(2))


# ------------------------------------------------------------------------------------------- flwr run
def test_pyproject_registers_the_apps_and_run_config_resolves(tmp_path: Path) -> None:
    from flwr.common.config import validate_config

    pyproject = tomli.loads((REPO / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=True, project_dir=REPO)
    assert ok, errors
    assert "federations" not in pyproject["tool"]["flwr"], "flwr 1.42 reads federations from $FLWR_HOME/config.toml"
    run_config = dict(pyproject["tool"]["flwr"]["app"]["config"])
    cfg = config_from_run_config(run_config)
    assert cfg.engine.kind == "flower" and cfg.name == "flower-demo"
    cfg = config_from_run_config({**run_config, "num-server-rounds": 7, "output": str(tmp_path),
                                  "overrides": "engine.strategy=fedmedian train.lr=0.5"})
    assert (cfg.engine.rounds, cfg.output, cfg.engine.strategy, cfg.train.lr) == (7, tmp_path, "fedmedian", 0.5)
    with pytest.raises(ConfigError, match="not found"):
        config_from_run_config({"config": "configs/nope.yaml"})
    with pytest.raises(ConfigError, match="needs 'flower'"):
        config_from_run_config({"config": "configs/demo.yaml"})


def test_a_teacher_to_train_is_trained_once_on_the_server_before_any_client(tmp_path: Path, monkeypatch) -> None:
    """KD with ``teacher.model``: the server trains it before round 1; every client reuses the saved copy."""
    import pipeline.teacher as teacher_mod
    import server.runner as runner_mod

    events = []
    real_train, real_build = teacher_mod.train_teacher, runner_mod.build_training_model
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda *a, **k: events.append("teacher") or real_train(*a, **k))
    monkeypatch.setattr(runner_mod, "build_training_model", lambda c: events.append("server") or real_build(c))
    raw = tiny_config(tmp_path, rounds=1)
    raw["teacher"] = {"model": {"name": "smallnet3"}, "train": {"epochs": 1, "batch_size": 32, "max_batches": 2}}
    raw["distill"] = {"kind": "kd"}
    summary = run_local(raw)
    assert events == ["teacher", "server"]  # trained once, before the server starts round 1
    assert (Path(tmp_path) / "fl" / "teacher" / "model.safetensors").is_file()
    assert math.isfinite(summary["test_accuracy"])


# --------------------------------------------------------------------------------- schedules across rounds
def test_lr_at_is_torchs_multistep_and_cosine_schedule() -> None:
    from pipeline.config import TrainConfig
    from pipeline.train import lr_at

    for cfg, make in [
        (TrainConfig(lr=0.1, schedule="multistep", milestones=[2, 4, 4], gamma=0.5, epochs=7),
         lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 4], gamma=0.5)),
        (TrainConfig(lr=0.1, schedule="cosine", epochs=7),
         lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)),
    ]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
        sched = make(opt)
        for epoch in range(7):
            assert lr_at(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), (cfg, epoch)
            opt.step()
            sched.step()


def _schedule_run(tmp_path: Path, name: str, schedule: dict, rounds: int = 3, resume: bool = False) -> dict:
    raw = tiny_config(tmp_path, clients=2, rounds=rounds, local_epochs=2, min_train_nodes=2)
    raw["train"].update(schedule)
    return {**raw, "name": name, "resume": resume}


@pytest.mark.parametrize("schedule", [
    {"schedule": "multistep", "milestones": [2, 5], "gamma": 0.1},   # global epochs 0..5: milestones cross rounds
    {"schedule": "cosine"},                                           # horizon: rounds x local_epochs = 6 epochs
])
def test_federated_rounds_follow_the_schedule_on_the_global_epoch_count(tmp_path: Path, schedule: dict,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server sends each round's LRs; clients apply them epoch by epoch; a crashed run resumed continues."""
    import pipeline.train as train_mod
    from pipeline.config import TrainConfig
    from pipeline.train import lr_at
    from pipeline.transport.wire import LRS_KEY
    from tests.fault_injection import recording_client_app

    applied: list[float] = []
    real_set_lr = train_mod.set_lr
    monkeypatch.setattr(train_mod, "set_lr", lambda opt, lr: applied.append(lr) or real_set_lr(opt, lr))
    seen: list[dict] = []
    run_local(_schedule_run(tmp_path, "straight", schedule), recording_client_app(seen))
    train_cfg = TrainConfig(lr=0.05, **schedule)
    expected = {r: [lr_at(train_cfg, (r - 1) * 2 + e, horizon=6) for e in range(2)] for r in (1, 2, 3)}
    if schedule["schedule"] == "multistep":
        assert expected == {1: [0.05, 0.05], 2: [pytest.approx(0.005)] * 2,
                            3: [pytest.approx(0.005), pytest.approx(0.0005)]}
    else:
        assert expected[1][0] == 0.05 and expected[3][1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 5 / 6)) / 2)
    assert len(seen) == 6
    for msg in seen:
        assert list(msg[LRS_KEY]) == expected[msg["round"]]
    assert applied == [lr for r in (1, 2, 3) for _ in range(2) for lr in expected[r]]  # 2 clients per round

    # a run that stops after round 1 (too few replies in round 2) and is resumed ends where the straight one did
    with pytest.raises(TooFewReplies):
        run_local(_schedule_run(tmp_path, "crashed", schedule), faulty_client_app({1: "raise"}, rounds={2}))
    resumed_seen: list[dict] = []
    run_local(_schedule_run(tmp_path, "crashed", schedule, resume=True), recording_client_app(resumed_seen))
    assert sorted((m["round"], list(m[LRS_KEY])) for m in resumed_seen) == sorted(
        (m["round"], list(m[LRS_KEY])) for m in seen if m["round"] > 1)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "crashed")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_flower_resume_refuses_a_changed_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.simulation

    from pipeline.engines.flower import run_flower

    raw = tiny_config(tmp_path, rounds=2)
    run_local(raw)
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: pytest.fail("the engine started Ray"))
    changed = config_from_dict({**raw, "resume": True, "engine": {**raw["engine"], "local_epochs": 2}})
    with pytest.raises(ResumeError, match=r"different engine\.local_epochs \(1, now 2\)"):
        run_flower(changed, changed.run_dir)  # refused by the engine before any simulation starts
    with pytest.raises(ResumeError, match=r"different train\.lr \(0\.05, now 0\.1\)"):
        run_local({**raw, "resume": True, "train": {**raw["train"], "lr": 0.1}})
    with pytest.raises(ResumeError, match=r"different engine\.strategy"):
        run_local({**raw, "resume": True, "engine": {**raw["engine"], "strategy": "fedmedian"}})
    with pytest.raises(ResumeError, match=r"engine\.rounds=2; a resume may only extend it"):
        run_local({**raw, "resume": True, "engine": {**raw["engine"], "rounds": 1}})
    summary = run_local({**raw, "resume": True, "engine": {**raw["engine"], "round_timeout": 5.0}})  # may change
    assert summary["rounds"] == 2


def test_checkpoints_carry_per_node_state_under_a_namespace(tmp_path: Path) -> None:
    from pipeline.checkpoint import NodeState

    cfg = config_from_dict(tiny_config(tmp_path))
    extra = {"codec": NodeState({"node-3/residual": torch.arange(6.0).reshape(2, 3)}, {"node-3": {"age": 2}})}
    save_round_checkpoint(tmp_path / "ck", ServerCheckpoint(1, {"w": torch.ones(2)}, {}, [], capture_rng(), extra), cfg)
    back = latest_round_checkpoint(tmp_path / "ck", cfg).extra
    assert back["codec"].meta == {"node-3": {"age": 2}}
    assert torch.equal(back["codec"].tensors["node-3/residual"], extra["codec"].tensors["node-3/residual"])
