"""ExpandNets on the Flower path with compact-space communication (``transport.communicate: compact``), in the
in-process LocalGrid with the real ClientApp: the wire layout, upload bytes, learning, the deployed model, the
nodes' own factors, resume and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import models
from clients.app import app as client_app
from pipeline.checkpoint import latest_round_checkpoint
from pipeline.config import ConfigError, config_from_dict
from pipeline.modeling import build_compact_model
from pipeline.transport.compact_space import compact_space
from pipeline.transport.node_store import FACTORS, load_latest, node_state_dir, run_state_dir
from pipeline.transport.wire import encode_state, record_nbytes
from server.local_grid import LocalGrid
from server.runner import run_server

SMALLNET7_LAYERS = ("stages.0.0", "stages.1.0", "stages.2.0")


def expand_config(tmp_path: Path, name: str, communicate: str | None = "compact", strategy: str = "ck",
                  rounds: int = 2, codec: list[str] | None = None, **transport) -> dict:
    t = {"communicate": communicate, **transport}
    if codec:
        t.update({"codec": codec, "error_feedback": True})
    return {
        "name": name, "seed": 5, "device": "cpu", "output": str(tmp_path),
        "data": {"train_limit": 96, "test_limit": 64, "augment": False, "partition": {"kind": "iid"}},
        "model": {"name": "smallnet7"},
        "compression": {"kind": "expand", "strategy": strategy, "rate": 4},
        "engine": {"kind": "flower", "rounds": rounds, "clients": 3, "min_train_nodes": 1},
        "transport": {k: v for k, v in t.items() if v is not None},
        "train": {"batch_size": 32, "lr": 0.05, "max_batches": 2, "eval_batch_size": 64},
        "tracking": {"mlflow": {"enabled": False}},
    }


def run(raw: dict) -> dict:
    cfg = config_from_dict(raw)
    return run_server(LocalGrid(client_app, cfg.engine.clients), cfg, cfg.run_dir)


def history(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())["history"]


def run_store(run_dir: Path, pid: int) -> Path:
    """Node ``pid``'s state folder of the run in ``run_dir`` (the run's key is in its round checkpoint)."""
    return run_state_dir(node_state_dir(run_dir, pid), latest_round_checkpoint(Path(run_dir) / "checkpoints").run_key)


def test_smallnet7_ck_layout_image_conv_falls_back_inner_layers_travel_compact(tmp_path: Path) -> None:
    space = compact_space(config_from_dict(expand_config(tmp_path, "layout")))
    assert space.layout.compact == ("stages.1.0", "stages.2.0")
    assert list(space.layout.fallback) == ["stages.0.0"] and space.layout.fallback["stages.0.0"] > 0.1
    compact_keys = set(models.trainable_state(models.build("smallnet7", num_classes=10)))
    factor_keys = {f"stages.0.0.chain.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert set(space.keys) == (compact_keys - {"stages.0.0.weight", "stages.0.0.bias"}) | factor_keys
    cl = compact_space(config_from_dict(expand_config(tmp_path, "layout", strategy="cl")))
    assert cl.layout.compact == SMALLNET7_LAYERS and not cl.layout.fallback


def test_upload_bytes_are_the_compact_nets_plus_the_fallback_factors(tmp_path: Path) -> None:
    compact = run(expand_config(tmp_path, "compact", rounds=1))
    factors = run(expand_config(tmp_path, "factors", communicate="factors", rounds=1))
    cfg = config_from_dict(expand_config(tmp_path, "compact"))
    net_state = models.trainable_state(build_compact_model(cfg))
    expanded_state = models.trainable_state(compact_space(cfg).template)
    fallback = {k: v for k, v in expanded_state.items() if k.startswith("stages.0.0.chain.")}
    wire = {k: v for k, v in net_state.items() if not k.startswith("stages.0.0.")} | fallback
    # exact: the compact net's tensors, the image conv's compact weight+bias replaced by its factors
    expected = record_nbytes(encode_state(wire, "fp32"))
    assert history(tmp_path / "compact")[0]["bytes_up_per_client"] == expected
    net_bytes = record_nbytes(encode_state(net_state, "fp32"))
    factor_bytes = 4 * sum(v.numel() for v in fallback.values())
    assert expected - net_bytes == pytest.approx(factor_bytes - 4 * (8 * 3 * 49 + 8), abs=200)  # key names aside
    assert factors["payload_bytes_up_per_client"] > 2 * compact["payload_bytes_up_per_client"]
    assert compact["transport_communicate"] == "compact" and factors["transport_communicate"] == "factors"
    assert compact["transport_factor_layers"] == "stages.0.0" and "transport_factor_layers" not in factors


def test_upload_bytes_under_a_codec_chain_shrink_with_the_compact_layout(tmp_path: Path) -> None:
    codec = ["topk(frac=0.1)", "qsgd(bits=8,block=256)"]
    compact = run(expand_config(tmp_path, "compact", codec=codec, downlink={"kind": "delta", "codec": codec}))
    factors = run(expand_config(tmp_path, "factors", communicate="factors", rounds=1, codec=codec))
    up = [r["bytes_up_codec_per_client"] for r in history(tmp_path / "compact")]
    assert 2 * max(up) < history(tmp_path / "factors")[0]["bytes_up_codec_per_client"]
    assert compact["payload_bytes_up_per_client"] < factors["payload_bytes_up_per_client"]
    # round 2 went down as a delta of the compact layout (far below the full layout of round 1)
    down = [r["bytes_down_per_client"] for r in history(tmp_path / "compact")]
    assert 3 * down[1] < down[0] and compact["rounds"] == 2


@pytest.mark.parametrize("strategy", ["ck", "cl"])
def test_compact_run_learns_deploys_the_global_layout_and_nodes_hold_lifted_factors(tmp_path: Path,
                                                                                    strategy: str) -> None:
    raw = expand_config(tmp_path, "run", strategy=strategy)
    if strategy == "cl":  # evaluate messages carry the global layout too: each node evaluates its materialisation
        raw["engine"]["evaluate_fraction"] = 1.0
    summary = run(raw)
    hist = history(tmp_path / "run")
    if strategy == "cl":  # the nodes' test shards cover the test set: their weighted accuracy is the server's
        assert hist[-1]["federated_test_accuracy"] == pytest.approx(hist[-1]["test_accuracy"], abs=1e-9)
    assert summary["rounds"] == 2 and hist[-1]["train_loss"] < hist[0]["train_loss"] + 1.0
    assert all(0 <= r["lift_residual"] < 1e-4 for r in hist)
    # the deployed model is the materialised global layout: its evaluation is the server's last evaluation
    assert summary["test_accuracy"] == pytest.approx(hist[-1]["test_accuracy"], abs=1e-12)
    assert summary["test_loss"] == pytest.approx(hist[-1]["test_loss"], rel=1e-6)
    cfg = config_from_dict(raw)
    space = compact_space(cfg)
    # a node's round-2 factors, back from the store, lifted with the round-2 global state: they contract to it
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("round-*.safetensors"))
    global_1 = {k.removeprefix("global/"): v for k, v in safetensors.torch.load_file(str(ckpt[0])).items()
                if k.startswith("global/")}
    assert set(global_1) == set(space.keys)
    own = load_latest(run_store(tmp_path / "run", 0), FACTORS, 2)
    assert own is not None and own[0] == 1
    # every node lifts the global model into the previous GLOBAL factors, so in-sync nodes hold the same factors
    held = [load_latest(run_store(tmp_path / "run", pid), FACTORS, 3) for pid in range(3)]
    assert all(h is not None and h[0] == 2 for h in held)
    for key, value in held[0][1].items():
        assert all(torch.equal(h[1][key], value) for h in held[1:]), key
    node = space.holding(own[1])
    report = space.receive(node, global_1)
    contracted = space.wire_state(node)
    for key, value in global_1.items():
        assert torch.allclose(contracted[key], value.float(), rtol=1e-5, atol=1e-5 * value.abs().max()), key
    assert report.layers and space.compact_residual(report) < 1e-5
    # lifting changed the node's own factors minimally: they are not the seeded ones, nor a fresh expansion's
    seeded = models.trainable_state(space.template)
    assert any(not torch.equal(seeded[k], v) for k, v in models.trainable_state(node).items())


def test_resume_of_a_compact_run_is_bit_identical(tmp_path: Path) -> None:
    run(expand_config(tmp_path / "a", "run", codec=["topk(frac=0.1)"]))
    run(expand_config(tmp_path / "b", "run", rounds=1, codec=["topk(frac=0.1)"]))
    resumed = run(expand_config(tmp_path / "b", "run", codec=["topk(frac=0.1)"]) | {"resume": True})
    assert resumed["rounds"] == 2
    a = safetensors.torch.load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("train_loss", "test_loss", "test_accuracy", "lift_residual", "bytes_up")  # the JSON config is resent
    assert [[r[k] for k in keys] for r in history(tmp_path / "a" / "run")] == \
        [[r[k] for k in keys] for r in history(tmp_path / "b" / "run")]


@pytest.mark.parametrize(("changes", "message"), [
    ({"compression": {"kind": "none"}}, "transport.communicate: compact applies only to compression.kind: expand"),
    ({"compression": {"kind": "none"}, "transport": {"communicate": "factors"}},
     "transport.communicate: factors applies only to compression.kind: expand"),
    ({"engine": {"kind": "ray"}}, "transport.communicate: used by the flower engine only"),
])
def test_communicate_where_it_cannot_apply_is_a_config_error(tmp_path: Path, changes: dict, message: str) -> None:
    raw = expand_config(tmp_path, "bad") | changes
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_expand_runs_on_flower_default_to_compact(tmp_path: Path) -> None:
    from pipeline.config import DEFAULT_EXPAND_COMMUNICATE, communicate_mode

    raw = expand_config(tmp_path, "default", communicate=None)
    assert communicate_mode(config_from_dict(raw)) == DEFAULT_EXPAND_COMMUNICATE == "compact"
    assert communicate_mode(config_from_dict(raw | {"compression": {"kind": "none"}})) is None


def test_resume_fingerprint_holds_the_effective_mode_and_reads_older_checkpoints_as_factors(tmp_path: Path) -> None:
    from pipeline.checkpoint import ResumeError, check_resume, config_fingerprint

    default = config_from_dict(expand_config(tmp_path, "fp", communicate=None))
    compact = config_from_dict(expand_config(tmp_path, "fp", communicate="compact"))
    factors = config_from_dict(expand_config(tmp_path, "fp", communicate="factors"))
    assert config_fingerprint(default)["transport"]["communicate"] == "compact"  # the default, resolved
    check_resume(config_fingerprint(default), compact, "ckpt")
    with pytest.raises(ResumeError, match="transport.communicate \\('compact', now 'factors'\\)"):
        check_resume(config_fingerprint(default), factors, "ckpt")  # a default run resumed as factors: refused
    older = config_fingerprint(factors)
    del older["transport"]["communicate"]  # written before the key existed: factors travelled
    check_resume(older, factors, "ckpt")
    with pytest.raises(ResumeError, match="transport.communicate \\('factors', now 'compact'\\)"):
        check_resume(older, compact, "ckpt")


def test_nodes_that_skip_rounds_or_join_late_lift_into_their_older_or_the_seeded_factors(tmp_path: Path) -> None:
    raw = expand_config(tmp_path, "turns", strategy="cl", rounds=3)
    raw["engine"]["fraction"] = 0.34  # one node per round: the others skip it, some train first in round 2 or 3
    run(raw)
    hist = history(tmp_path / "turns")
    assert [r["replies_ok"] for r in hist] == [1, 1, 1] and all(r["lift_residual"] < 1e-4 for r in hist)
    trained = {}
    for pid in range(3):
        folder = run_store(tmp_path / "turns", pid)
        trained[pid] = sorted(int(p.stem.rsplit("-", 1)[1]) for p in folder.glob("factors-round-*.safetensors"))
    rounds = sorted(r for rs in trained.values() for r in rs)
    assert rounds == [1, 2, 3], trained
    assert any(rs and rs[0] > 1 for rs in trained.values()), trained  # a node without factors joined late


def test_receive_refuses_a_state_of_another_layout(tmp_path: Path) -> None:
    space = compact_space(config_from_dict(expand_config(tmp_path, "keys")))
    wire = space.wire_state(space.template)
    with pytest.raises(ValueError, match="missing key 'stages.0.0.chain.0.weight'"):
        space.receive(space.holding(models.trainable_state(space.template)),
                      {k: v for k, v in wire.items() if k != "stages.0.0.chain.0.weight"})
    with pytest.raises(ValueError, match="unexpected key 'stages.0.0.weight'"):
        space.receive(space.holding(models.trainable_state(space.template)),
                      wire | {"stages.0.0.weight": torch.zeros(8, 3, 7, 7)})
