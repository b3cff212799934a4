"""Update codecs on the Flower path (in-process LocalGrid, real ClientApp): encoded uploads and their bytes,
error feedback across rounds, skipped rounds and a resume, header refusal, malformed replies, the robust rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.app import app as client_app
from pipeline.checkpoint import latest_round_checkpoint
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.report import summary_rows
from pipeline.transport.error_feedback import ErrorFeedback
from pipeline.transport.node_store import (
    claim_node_stores,
    legacy_run_key,
    load_residuals,
    node_state_dir,
    run_state_dir,
    save_residuals,
    save_round,
)
from pipeline.transport.update import header
from pipeline.transport.wire import (
    CONFIG_KEY,
    HEADER_KEY,
    RUN_KEY,
    UPDATE_KEY,
    decode_array,
    encode_tensor,
    record_to_encoded,
    update_to_record,
)
from server.local_grid import LocalGrid
from server.runner import run_server
from tests.hostile_clients import hostile_app

TOPK = ["topk(frac=0.01)"]


def codec_config(tmp_path: Path, name: str = "codec", codec=TOPK, ef: bool = True, rounds: int = 2,
                 seed: int = 3, **engine) -> dict:
    return {
        "name": name, "seed": seed, "device": "cpu", "output": str(tmp_path),
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


def run_store(run_dir: Path, pid: int) -> Path:
    """Node ``pid``'s state folder of the run in ``run_dir`` (the run's key is in its round checkpoint)."""
    key = latest_round_checkpoint(Path(run_dir) / "checkpoints").run_key
    return run_state_dir(node_state_dir(run_dir, pid), key)


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
        folder = run_store(tmp_path / "codec", pid)
        assert sorted(p.name for p in folder.iterdir()) == ["ef-round-1.safetensors", "ef-round-2.safetensors"]
        fb = load_residuals(folder, 3, 1.0)
        assert fb.norm() > 0 and set(fb.rounds.values()) == {2}


@pytest.mark.parametrize("codec", [TOPK, ["lowrank(rank=2)", "qsgd(bits=4,block=64)"]])
def test_resume_with_error_feedback_is_bit_identical(tmp_path: Path, codec: list[str]) -> None:
    whole = run(codec_config(tmp_path / "a", "run", rounds=3, codec=codec))
    assert whole["rounds"] == 3
    run(codec_config(tmp_path / "b", "run", rounds=2, codec=codec))
    key = latest_round_checkpoint(tmp_path / "b" / "run" / "checkpoints").run_key
    resumed = run(codec_config(tmp_path / "b", "run", rounds=3, codec=codec) | {"resume": True})
    assert resumed["rounds"] == 3
    a = safetensors.torch.load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run is the same run: same key, one folder per node, its files of rounds 2 and 3
    assert latest_round_checkpoint(tmp_path / "b" / "run" / "checkpoints").run_key == key
    for pid in range(3):
        assert [p.name for p in node_state_dir(tmp_path / "b" / "run", pid).iterdir()] == [f"run-{key}"]
        assert sorted(p.name for p in run_store(tmp_path / "b" / "run", pid).iterdir()) == \
            ["ef-round-2.safetensors", "ef-round-3.safetensors"]


def test_a_checkpoint_from_before_run_keys_resumes_bit_identical_with_its_flat_node_files(tmp_path: Path) -> None:
    from pipeline.checkpoint import list_round_checkpoints, read_checkpoint, write_checkpoint

    run(codec_config(tmp_path / "a", "run", rounds=3))
    run(codec_config(tmp_path / "b", "run", rounds=2))
    old = tmp_path / "b" / "run"
    for pid in range(3):  # the layout before run keys: files straight in the node's folder
        for f in run_store(old, pid).iterdir():
            f.rename(node_state_dir(old, pid) / f.name)
        run_store(old, pid).rmdir()
    for path in list_round_checkpoints(old / "checkpoints"):
        tensors, meta = read_checkpoint(path)
        del meta["run_key"]
        write_checkpoint(path, tensors, meta)
    run(codec_config(tmp_path / "b", "run", rounds=3) | {"resume": True})
    a = safetensors.torch.load_file(str(tmp_path / "a" / "run" / "model.safetensors"))
    b = safetensors.torch.load_file(str(old / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert latest_round_checkpoint(old / "checkpoints").run_key == legacy_run_key("run")  # kept from now on
    assert [p.name for p in node_state_dir(old, 0).iterdir()] == [f"run-{legacy_run_key('run')}"]


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


def test_writing_a_round_removes_later_rounds_before_keeping_the_two_newest(tmp_path: Path) -> None:
    for rnd in (3, 4, 5):  # an abandoned future (or, before run keys, another run's files)
        save_round(tmp_path, "ef", rnd, {"w": torch.full((2,), float(rnd))})
    save_round(tmp_path, "global", 9, {"w": torch.zeros(2)})  # another kind is left alone
    save_round(tmp_path, "ef", 1, {"w": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ef-round-1.safetensors", "global-round-9.safetensors"]
    save_round(tmp_path, "ef", 2, {"w": torch.ones(2)})
    save_round(tmp_path, "ef", 4, {"w": torch.ones(2)})  # a later round keeps the two newest, as before
    assert sorted(p.name for p in tmp_path.glob("ef-*")) == ["ef-round-2.safetensors", "ef-round-4.safetensors"]


def test_run_keys_are_checked_before_they_name_a_folder(tmp_path: Path) -> None:
    key = "0123456789abcdef" * 2
    assert run_state_dir(tmp_path, key) == tmp_path / f"run-{key}"
    assert len(legacy_run_key("codec")) == 32 and legacy_run_key("codec") == legacy_run_key("codec")
    for bad in ("../" * 11, key.upper(), key[:-1], key + "0", f"{key[:31]}/", None, 12, "x" * 500):
        with pytest.raises(ValueError, match="run key must be 32 lowercase hex characters, got"):
            run_state_dir(tmp_path, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as info:
        run_state_dir(tmp_path, "x" * 500)
    assert len(str(info.value)) < 120 and "\n" not in str(info.value)


def test_the_simulation_server_clears_other_runs_node_state_and_adopts_a_pre_key_runs_files(tmp_path: Path) -> None:
    mine, other = "a" * 32, "b" * 32
    node = node_state_dir(tmp_path, 0)
    save_round(run_state_dir(node, mine), "ef", 2, {"w": torch.ones(1)})
    save_round(run_state_dir(node, other), "ef", 7, {"w": torch.ones(1)})
    save_round(node, "ef", 3, {"w": torch.ones(1)})  # flat: written before run keys
    (node / "notes.txt").write_text("not ours")  # anything else is left alone
    removed = claim_node_stores(tmp_path, mine)
    assert sorted(p.name for p in removed) == ["ef-round-3.safetensors", f"run-{other}"]
    assert sorted(p.name for p in node.iterdir()) == ["notes.txt", f"run-{mine}"]
    assert [p.name for p in run_state_dir(node, mine).iterdir()] == ["ef-round-2.safetensors"]
    save_round(node, "global", 3, {"w": torch.ones(1)})
    legacy = legacy_run_key("codec")  # resuming a checkpoint from before run keys: its flat files are its own
    assert claim_node_stores(tmp_path, legacy, adopt_flat_files=True)[0].name == f"run-{mine}"
    assert [p.name for p in run_state_dir(node, legacy).iterdir()] == ["global-round-3.safetensors"]


def test_a_node_skipping_rounds_keeps_its_residual(tmp_path: Path) -> None:
    run(codec_config(tmp_path, rounds=3, fraction=0.34))  # one node per round: the others skip it
    last_round = {}
    for pid in range(3):
        folder = run_store(tmp_path / "codec", pid)
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
        CONFIG_KEY: config_to_json(cfg), LRS_KEY: [0.05], "server-round": 2, HEADER_KEY: json.dumps(head),
        RUN_KEY: "c" * 32})})
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


@pytest.mark.parametrize("key", ["../../tmp/x" + "0" * 21, "C" * 32, "c" * 31, 7, None])
def test_a_node_refuses_a_malformed_run_key_with_a_one_line_reason(tmp_path: Path, key) -> None:
    raw = codec_config(tmp_path)
    msg, ctx = _train_message(raw, header(config_from_dict(raw).transport, 2))
    if key is None:
        del msg.content["config"][RUN_KEY]
    else:
        msg.content["config"][RUN_KEY] = key
    with pytest.raises(ValueError, match=f"node refuses the server's message: message config '{RUN_KEY}' must be "
                                         "32 lowercase hex characters") as info:
        client_app(msg, ctx)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "codec").exists()  # refused before anything was written


def test_malformed_encoded_replies_are_dropped_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def break_indices(reply: Message, _base) -> None:  # the buffer ends inside the last tensor's parts
        array = reply.content["arrays"][UPDATE_KEY]
        reply.content["arrays"][UPDATE_KEY] = encode_tensor(decode_array(array)[:-3])

    def drop_header(reply: Message, _base) -> None:
        reply.content["arrays"] = ArrayRecord({"transport-header": reply.content["arrays"][UPDATE_KEY]})

    summary = run(codec_config(tmp_path), hostile_app({1: break_indices, 2: drop_header}))
    hist = history(tmp_path / "codec")
    assert summary["rounds"] == 2 and all(r["replies_dropped"] == 2 and r["replies_ok"] == 1 for r in hist)
    assert "dropped reply from node 1001 (train): encoded update does not decode" in caplog.text
    assert "node 1001 (train): encoded update does not decode: update tensor 'stages.2.1.weight': payload ends " \
        in caplog.text
    assert "node 1002 (train): encoded update does not decode: encoded update: expected the one array 'update', " \
        "got 1 array(s) ['transport-header']" in caplog.text


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
            for f in node_state_dir(tmp_path / "codec", 2).glob("run-*/global-round-*"):
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


def test_a_node_that_missed_a_round_gets_the_full_model_next_instead_of_an_unusable_delta(tmp_path: Path) -> None:
    """Offline in round 2 (its message never reached the training code), node 1 holds round 1's model; the
    server must not assume it stored round 2's: round 3 sends it the full model and it trains (no lost round)."""
    seen: list[tuple[int, int, str]] = []
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        pid, config = int(context.node_config["partition-id"]), msg.content["config"]
        seen.append((int(config["server-round"]), pid, str(config["downlink"])))
        if (int(config["server-round"]), pid) == (2, 1):
            raise ConnectionError("partition 1 is offline")
        return client_app(msg, context)

    run(codec_config(tmp_path, rounds=3) | {"transport": DELTA_TRANSPORT}, app)
    kinds = {(rnd, pid): kind for rnd, pid, kind in seen}
    assert kinds[(3, 1)] == "full" and kinds[(3, 0)] == "delta", sorted(seen)
    assert [r["replies_failed"] for r in history(tmp_path / "codec")] == [0, 1, 0]


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


def test_a_fresh_run_into_a_dir_holding_an_earlier_runs_node_state_matches_one_into_an_empty_dir(
        tmp_path: Path) -> None:
    raw = {"transport": DELTA_TRANSPORT}  # error feedback and the delta downlink: both keep files per round
    run(codec_config(tmp_path / "empty", "run", rounds=3) | raw)
    run(codec_config(tmp_path / "used", "run", rounds=5, seed=4) | raw)  # an earlier run, further along
    run(codec_config(tmp_path / "used", "run", rounds=3) | raw)  # a fresh run (not a resume) of the same name
    a = safetensors.torch.load_file(str(tmp_path / "empty" / "run" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "used" / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("train_loss", "test_loss", "replies_ok", "replies_failed", "bytes_up", "bytes_down")
    assert [[r[k] for k in keys] for r in history(tmp_path / "empty" / "run")] == \
        [[r[k] for k in keys] for r in history(tmp_path / "used" / "run")]


def test_dense_warmup_rounds_send_dense_updates_first(tmp_path: Path) -> None:
    raw = codec_config(tmp_path)
    raw["transport"]["dense_warmup_rounds"] = 1
    run(raw)
    hist = history(tmp_path / "codec")
    assert hist[0]["bytes_up_codec_per_client"] > 20 * hist[1]["bytes_up_codec_per_client"]


def test_the_screen_sees_decoded_updates_and_clips_an_inflated_encoded_one(tmp_path: Path) -> None:
    raw = codec_config(tmp_path)
    transport = config_from_dict(raw).transport

    def inflate(reply: Message, base) -> None:
        layout = {k: tuple(v.shape) for k, v in base.items()}
        enc = record_to_encoded(reply.content["arrays"], transport, layout, 1)  # no warm-up: one chain every round
        for part in enc.tensors.values():
            if "values" in part.parts:
                part.parts["values"] = part.parts["values"] * 1000.0
        reply.content["arrays"] = update_to_record(enc)

    run(raw, hostile_app({1: inflate}))
    hist = history(tmp_path / "codec")
    assert [r["replies_clipped"] for r in hist] == [1, 1] and all(r["replies_ok"] == 3 for r in hist)
