"""Update codecs on the Flower path (in-process LocalGrid, real ClientApp): encoded uploads and their bytes,
error feedback across rounds, skipped rounds and a resume, header refusal, malformed replies, the robust rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.app import app as client_app
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.report import summary_rows
from pipeline.transport.error_feedback import ErrorFeedback
from pipeline.transport.node_store import load_residuals, node_state_dir, save_residuals
from pipeline.transport.update import header
from pipeline.transport.wire import CONFIG_KEY, HEADER_KEY, decode_array, encode_tensor
from server.local_grid import LocalGrid
from server.runner import run_server
from tests.hostile_clients import hostile_app

TOPK = ["topk(frac=0.01)"]


def codec_config(tmp_path: Path, name: str = "codec", codec=TOPK, ef: bool = True, rounds: int = 2,
                 **engine) -> dict:
    return {
        "name": name, "seed": 3, "device": "cpu", "output": str(tmp_path),
        "data": {"train_limit": 96, "test_limit": 32, "augment": False, "partition": {"kind": "iid"}},
        "model": {"name": "smallnet3"},
        "engine": {"kind": "flower", "rounds": rounds, "clients": 3, "min_train_nodes": 1, **engine},
        "transport": {"codec": codec, "error_feedback": ef, "exclude": ["*.bias"]},
        "train": {"batch_size": 32, "lr": 0.05, "max_batches": 1, "eval_batch_size": 32},
        "tracking": {"mlflow": {"enabled": False}},
    }


def run(raw: dict, app=client_app) -> dict:
    cfg = config_from_dict(raw)
    return run_server(LocalGrid(app, cfg.engine.clients), cfg, cfg.run_dir)


def history(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())["history"]


def test_topk_uploads_are_encoded_sizes_far_below_dense_and_residuals_carry(tmp_path: Path) -> None:
    dense = run(codec_config(tmp_path, "dense", codec=[], ef=False) | {"transport": {}})
    summary = run(codec_config(tmp_path))
    hist = history(tmp_path / "codec")
    dense_hist = history(tmp_path / "dense")
    up, dense_up = hist[-1]["bytes_up_per_client"], dense_hist[-1]["bytes_up_per_client"]
    assert up * 5 < dense_up, (up, dense_up)
    # groups add up to the serialised record; the codec group is the smallest share of a top-k 1% upload
    groups = {g: hist[-1][f"bytes_up_{g}_per_client"] for g in ("codec", "excluded", "bn", "header")}
    assert groups["codec"] < dense_up / 20 and groups["bn"] > 0 and groups["excluded"] > 0
    assert hist[-1]["message_bytes_up"] > hist[-1]["bytes_up"]
    assert summary["upload_compression"] > 5 and summary["bytes_per_round"]
    assert summary["bytes_up_codec_per_client_round"] < summary["bytes_up_bn_per_client_round"] * 10
    rows = {row[0]: row for row in summary_rows(summary)}
    assert "x smaller than dense fp32" in rows["upload per client per round"][2]
    assert dense["upload_compression"] == pytest.approx(1.0, rel=0.01)
    # error feedback: every node has a residual file per round (two kept), and the residual is nonzero
    for pid in range(3):
        folder = node_state_dir(tmp_path / "codec", pid)
        assert sorted(p.name for p in folder.iterdir()) == ["ef-round-1.safetensors", "ef-round-2.safetensors"]
        fb = load_residuals(folder, 3, 1.0)
        assert fb.norm() > 0 and set(fb.rounds.values()) == {2}


def test_resume_with_error_feedback_is_bit_identical(tmp_path: Path) -> None:
    whole = run(codec_config(tmp_path / "a", "run", rounds=3))
    assert whole["rounds"] == 3
    run(codec_config(tmp_path / "b", "run", rounds=2))
    resumed = run(codec_config(tmp_path / "b", "run", rounds=3) | {"resume": True})
    assert resumed["rounds"] == 3
    a = safetensors.torch.load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_store_reads_the_newest_earlier_round_so_a_rerun_round_repeats(tmp_path: Path) -> None:
    fb = ErrorFeedback()
    fb.record("w", torch.ones(3), torch.zeros(3), 1)
    save_residuals(tmp_path, 1, fb)
    fb.record("w", torch.full((3,), 2.0), torch.zeros(3), 4)
    save_residuals(tmp_path, 4, fb)  # written by an attempt of round 4 that was killed before its checkpoint
    assert torch.equal(load_residuals(tmp_path, 4, 1.0).residuals["w"], torch.ones(3))  # the rerun's input
    # a node that skipped rounds 2 and 3 keeps its residual, aged by decay ** skipped
    aged = load_residuals(tmp_path, 4, 0.5).compensate("w", torch.zeros(3), 4)
    assert torch.allclose(aged, torch.full((3,), 0.25))


def test_a_node_skipping_rounds_keeps_its_residual(tmp_path: Path) -> None:
    run(codec_config(tmp_path, rounds=3, fraction=0.34))  # one node per round: the others skip it
    last_round = {}
    for pid in range(3):
        folder = node_state_dir(tmp_path / "codec", pid)
        rounds = sorted(int(p.stem.rsplit("-", 1)[1]) for p in folder.glob("ef-round-*.safetensors"))
        if rounds:
            fb = load_residuals(folder, 4, 1.0)  # what the node would use in round 4
            assert set(fb.rounds.values()) == {rounds[-1]} and fb.norm() > 0
            last_round[pid] = rounds[-1]
    assert sorted(last_round.values())[-1] == 3 and min(last_round.values()) < 3, last_round


def _train_message(cfg_raw: dict, head: dict) -> tuple[Message, Context]:
    import models
    from pipeline.modeling import build_training_model
    from pipeline.transport.wire import LRS_KEY, config_to_json, encode_state

    cfg = config_from_dict(cfg_raw)
    state = models.trainable_state(build_training_model(cfg))
    content = RecordDict({"arrays": encode_state(state), "config": ConfigRecord({
        CONFIG_KEY: config_to_json(cfg), LRS_KEY: [0.05], "server-round": 2, HEADER_KEY: json.dumps(head)})})
    msg = Message(content, 1000, "train")
    ctx = Context(run_id=0, node_id=1000, node_config={"partition-id": 0, "num-partitions": 3},
                  state=RecordDict(), run_config={})
    return msg, ctx


def test_a_node_refuses_a_chain_mismatch_with_a_reason(tmp_path: Path) -> None:
    raw = codec_config(tmp_path)
    other = config_from_dict(codec_config(tmp_path, codec=["sign"])).transport
    msg, ctx = _train_message(raw, header(other, 2))
    with pytest.raises(ValueError, match="node refuses the server's message: transport header: codec 'sign'"):
        client_app(msg, ctx)


def test_malformed_encoded_replies_are_dropped_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def break_indices(reply: Message, _base) -> None:
        arrays = reply.content["arrays"]
        key = next(k for k in arrays if k.endswith("/indices"))
        arrays[key] = arrays[HEADER_KEY]  # a uint8 header where int indices belong

    def drop_header(reply: Message, _base) -> None:
        del reply.content["arrays"][HEADER_KEY]

    summary = run(codec_config(tmp_path), hostile_app({1: break_indices, 2: drop_header}))
    hist = history(tmp_path / "codec")
    assert summary["rounds"] == 2 and all(r["replies_dropped"] == 2 and r["replies_ok"] == 1 for r in hist)
    assert "dropped reply from node 1001 (train): encoded update does not decode" in caplog.text
    assert "node 1002 (train): encoded update does not decode: encoded update lacks its 'transport-header'" \
        in caplog.text


def test_robust_aggregators_refuse_sparse_codecs_and_take_dense_ones(tmp_path: Path) -> None:
    for strategy in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
        with pytest.raises(ConfigError, match=f"engine.strategy {strategy} aggregates coordinate-wise"):
            load_config(None, ["engine.kind=flower", f"engine.strategy={strategy}", "engine.clients=7",
                               "transport.codec=[topk(frac=0.1), qsgd(bits=8)]"])
    load_config(None, ["engine.kind=flower", "engine.strategy=fedmedian", "transport.codec=qsgd(bits=4)"])


def test_run_config_travels_once_per_node_and_a_node_that_lost_it_gets_it_again(tmp_path: Path) -> None:
    carried: list[tuple[int, int, bool]] = []
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        carried.append((rnd, pid, CONFIG_KEY in msg.content["config"]))
        if (rnd, pid) == (2, 1):  # node 1 restarted between rounds: its cache is gone
            context.state = RecordDict()
        return client_app(msg, context)

    summary = run(codec_config(tmp_path, rounds=3), app)
    hist = history(tmp_path / "codec")
    assert sorted(carried) == [(1, 0, True), (1, 1, True), (1, 2, True), (2, 0, False), (2, 1, False),
                               (2, 2, False), (3, 0, False), (3, 1, True), (3, 2, False)]
    assert [r["replies_failed"] for r in hist] == [0, 1, 0] and summary["rounds"] == 3
    assert hist[1]["message_bytes_down"] < hist[0]["message_bytes_down"]  # no config JSON in round 2


DELTA_TRANSPORT = {"codec": ["topk(frac=0.05)"], "error_feedback": True, "exclude": ["*.bias"],
                   "downlink": {"kind": "delta", "codec": ["qsgd(bits=8, block=256)"]}}


def test_delta_downlink_goes_to_nodes_holding_the_previous_round_and_full_to_the_rest(tmp_path: Path) -> None:
    seen: list[tuple[int, int, str, int]] = []
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        pid, config = int(context.node_config["partition-id"]), msg.content["config"]
        seen.append((int(config["server-round"]), pid, str(config["downlink"]), int(config["base-round"])))
        if (int(config["server-round"]), pid) == (3, 2):  # node 2 restarted without its folder (a stale base)
            for f in node_state_dir(tmp_path / "codec", 2).glob("global-round-*"):
                f.unlink()
        return client_app(msg, context)

    raw = codec_config(tmp_path, rounds=4, fraction=0.67) | {"transport": DELTA_TRANSPORT}
    summary = run(raw, app)
    hist = history(tmp_path / "codec")
    kinds = {(rnd, pid): kind for rnd, pid, kind, _ in seen}
    lost = kinds.get((3, 2)) == "delta"  # node 2 lost its base before applying round 3's delta: it refuses
    assert lost and (4, 2) in kinds, sorted(seen)  # the seeded sampling puts node 2 in rounds 2, 3 and 4
    sent: dict[int, set[int]] = {}
    for rnd, pid, kind, base in sorted(seen):
        sent.setdefault(rnd, set()).add(pid)
        fresh = rnd > 1 and pid in sent.get(rnd - 1, set()) and (rnd, pid) != (4, 2)
        assert (kind, base) == (("delta", rnd - 1) if fresh else ("full", 0)), (rnd, pid, kind, base)
    assert [r["replies_failed"] for r in hist] == [0, 0, 1, 0] and summary["rounds"] == 4
    assert "delta" in kinds.values() and "full" in kinds.values()


def test_resume_with_delta_downlink_is_bit_identical(tmp_path: Path) -> None:
    raw = {"transport": DELTA_TRANSPORT}
    run(codec_config(tmp_path / "a", "run", rounds=3) | raw)
    run(codec_config(tmp_path / "b", "run", rounds=2) | raw)
    run(codec_config(tmp_path / "b", "run", rounds=3) | raw | {"resume": True})
    a = safetensors.torch.load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    down_a = [r["bytes_down_per_client"] for r in history(tmp_path / "a" / "run")]
    assert down_a[1] < down_a[0] / 2  # round 2 sends the 8-bit change, round 1 the fp32 model


def test_dense_warmup_rounds_send_dense_updates_first(tmp_path: Path) -> None:
    raw = codec_config(tmp_path)
    raw["transport"]["dense_warmup_rounds"] = 1
    run(raw)
    hist = history(tmp_path / "codec")
    assert hist[0]["bytes_up_codec_per_client"] > 20 * hist[1]["bytes_up_codec_per_client"]


def test_the_screen_sees_decoded_updates_and_clips_an_inflated_encoded_one(tmp_path: Path) -> None:
    def inflate(reply: Message, _base) -> None:
        arrays = reply.content["arrays"]
        for key in [k for k in arrays if k.endswith("/values")]:
            arrays[key] = encode_tensor(decode_array(arrays[key]) * 1000.0)

    run(codec_config(tmp_path), hostile_app({1: inflate}))
    hist = history(tmp_path / "codec")
    assert [r["replies_clipped"] for r in hist] == [1, 1] and all(r["replies_ok"] == 3 for r in hist)
