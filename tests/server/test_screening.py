"""Reply screening: every refusal names its fault; metrics are rebuilt; weights capped; updates bounded.

Unit tests on crafted replies, plus two in-process runs (``server.local_grid.LocalGrid``, real ClientApp
wrapped by ``tests.hostile_clients``) showing that malformed metrics or partition claims never abort a run.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedMedian, MultiKrum

import models
from pipeline.config import ConfigError, config_from_dict
from pipeline.transport.codecs import CodecContext, parse_chain
from pipeline.transport.wire import encode_state, encode_tensor
from server.example_weights import capped_weights
from server.local_grid import LocalGrid
from server.runner import run_server
from server.strategies import build_strategy
from server.update_screen import round_agreement, screen_updates, update_norms
from server.validation import (
    EVALUATE_METRICS,
    TRAIN_METRICS,
    ReplyRejected,
    check_evaluate_content,
    check_reply,
    clean_metrics,
    expected_layout,
    partition_of,
)
from tests.hostile_clients import ModelAttack, drop_metric, hostile_app, set_metric

GOOD_METRICS = {"num-examples": 10, "train-loss": 1.5, "train-accuracy": 0.25, "partition-id": 0}


def bn_state() -> dict[str, torch.Tensor]:
    """A small trainable state with a BN layer (weights, bias, running statistics)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    return {k: v.clone() for k, v in models.trainable_state(net).items()}


def raw_metrics(metrics: dict) -> MetricRecord:
    """A MetricRecord holding ``metrics`` as given (bypassing the type check, as a hand-made message could)."""
    record = MetricRecord()
    record._data.update(metrics)  # noqa: SLF001
    return record


def reply(arrays: ArrayRecord, metrics: dict | None = None) -> RecordDict:
    return RecordDict({"arrays": arrays, "metrics": raw_metrics(GOOD_METRICS if metrics is None else metrics)})


def numpy_array(data: np.ndarray, declared: str) -> Array:
    """A NumPy-serialised Flower Array whose header declares ``declared`` whatever ``data`` holds."""
    buffer = io.BytesIO()
    np.save(buffer, data, allow_pickle=False)
    return Array(dtype=declared, shape=tuple(data.shape), stype="numpy.ndarray", data=buffer.getvalue())


def reason_for(arrays: ArrayRecord, layout, metrics: dict | None = None) -> str:
    state, reason = check_reply(reply(arrays, metrics), layout)
    assert state is None and reason is not None
    return reason


# ------------------------------------------------------------------------------------------- arrays
def test_a_good_reply_decodes_to_fp32_in_either_serialisation() -> None:
    state = bn_state()
    layout = expected_layout(state, "fp32")
    for arrays in (encode_state(state), ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})):
        decoded, reason = check_reply(reply(arrays), layout)
        assert reason is None and all(torch.equal(decoded[k], state[k]) for k in state)


def test_each_array_fault_is_refused_with_its_name() -> None:
    state = bn_state()
    layout = expected_layout(state, "fp32")
    key = "0.weight"
    shape = tuple(state[key].shape)

    def with_array(array: Array) -> ArrayRecord:
        record = encode_state(state)
        record[key] = array
        return record

    raw = encode_state(state)[key]
    cases = {
        "data dtype <c8, declared float32": with_array(numpy_array(np.zeros(shape, np.complex64), "float32")),
        "data dtype <i4, declared float32": with_array(numpy_array(np.zeros(shape, np.int32), "float32")),
        "data dtype >f4, declared float32": with_array(numpy_array(np.zeros(shape, ">f4"), "float32")),
        "data has shape (3,)": with_array(Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                                                data=numpy_array(np.zeros(3, np.float32), "float32").data)),
        "unknown serialisation 'pickle'": with_array(Array(dtype="float32", shape=shape, stype="pickle",
                                                           data=raw.data)),
        "cannot decode": with_array(Array(dtype="float32", shape=shape, stype=raw.stype, data=raw.data[:-4])),
        "dtype float64, expected float32": with_array(encode_tensor(state[key].double())),
        f"array {key!r}: shape": encode_state({**state, key: torch.zeros(5, 3, 3, 3)}),
        "missing key": encode_state({k: v for k, v in state.items() if k != key}),
        "unexpected key '1.num_batches_tracked'": encode_state({**state, "1.num_batches_tracked": torch.zeros(1)}),
        "non-finite": encode_state({**state, key: torch.full(shape, math.nan)}),
        "2 non-finite": encode_state({**state, key: torch.zeros(shape).flatten().index_fill_(
            0, torch.tensor([1, 7]), math.inf).view(shape)}),
        "negative BN variances": encode_state({**state, "1.running_var": torch.tensor([1.0, -0.1, 1.0, 1.0])}),
    }
    for expected, arrays in cases.items():
        assert expected in reason_for(arrays, layout), expected


def test_reply_structure_and_weight_faults_are_refused() -> None:
    state = bn_state()
    layout = expected_layout(state, "fp32")
    arrays = encode_state(state)
    two = RecordDict({"arrays": arrays, "more": arrays, "metrics": MetricRecord(GOOD_METRICS)})
    assert "exactly one ArrayRecord" in check_reply(two, layout)[1]
    extra_config = RecordDict({"arrays": arrays, "metrics": MetricRecord(GOOD_METRICS), "c": ConfigRecord({"a": 1})})
    assert "unexpected ConfigRecord" in check_reply(extra_config, layout)[1]
    assert "exactly one MetricRecord" in check_reply(RecordDict({"arrays": arrays}), layout)[1]
    for bad in (0, -3, 2.5, math.nan, True):
        assert "'num-examples'" in reason_for(arrays, layout, {**GOOD_METRICS, "num-examples": bad}), bad


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_are_rebuilt_with_exactly_the_expected_keys() -> None:
    record = MetricRecord({**GOOD_METRICS, "sneaky": 1e9, "bytes-sent": 5})
    assert clean_metrics(record, TRAIN_METRICS) == {"num-examples": 10, "train-loss": 1.5, "train-accuracy": 0.25}
    faults = {
        "'train-loss' missing": {k: v for k, v in GOOD_METRICS.items() if k != "train-loss"},
        "'train-loss' is not finite": {**GOOD_METRICS, "train-loss": math.nan},
        "'train-loss' must be >= 0": {**GOOD_METRICS, "train-loss": -1.0},
        "'train-accuracy' must be in [0, 1]": {**GOOD_METRICS, "train-accuracy": 1.5},
        "'train-accuracy' missing or not a number (got list)": {**GOOD_METRICS, "train-accuracy": [0.1, 0.2]},
    }
    for expected, metrics in faults.items():
        with pytest.raises(ReplyRejected, match=re.escape(expected)):
            clean_metrics(MetricRecord(metrics), TRAIN_METRICS)
    record = raw_metrics({**GOOD_METRICS, "train-loss": "low"})
    with pytest.raises(ReplyRejected, match="'train-loss' missing or not a number \\(got str\\)"):
        clean_metrics(record, TRAIN_METRICS)


def test_partition_ids_must_be_whole_numbers_in_range() -> None:
    assert partition_of(MetricRecord({"partition-id": 3}), 5) == 3
    for bad, expected in ((5, "outside 0..4"), (-1, "outside 0..4"), (1.5, "not a whole number")):
        with pytest.raises(ReplyRejected, match=expected):
            partition_of(MetricRecord({"partition-id": bad}), 5)
    with pytest.raises(ReplyRejected, match="missing"):
        partition_of(MetricRecord({}), 5)


def test_evaluate_replies_carry_only_metrics() -> None:
    metrics = {"num-examples": 4, "test-loss": 2.0, "test-accuracy": 0.5, "partition-id": 1}
    record = check_evaluate_content(RecordDict({"metrics": MetricRecord(metrics)}))
    assert clean_metrics(record, EVALUATE_METRICS) == {"num-examples": 4, "test-loss": 2.0, "test-accuracy": 0.5}
    with pytest.raises(ReplyRejected, match="carries only metrics"):
        check_evaluate_content(RecordDict({"metrics": MetricRecord(metrics), "arrays": encode_state(bn_state())}))
    with pytest.raises(ReplyRejected, match="exactly one MetricRecord"):
        check_evaluate_content(RecordDict({}))


# ------------------------------------------------------------------------------------------ weights
def test_example_weights_are_capped_by_each_rule() -> None:
    claims = [(0, 100), (1, 50), (2, 1_000_000), (3, 80)]
    sizes = {0: 120, 1: 60, 2: 90, 3: 70}
    assert capped_weights("partition", claims, "train", lambda split, pid: sizes[pid]) == [100, 50, 90, 70]
    assert capped_weights("median", claims, "train") == [80, 50, 80, 80]
    assert capped_weights("uniform", claims, "train") == [1, 1, 1, 1]
    assert capped_weights("claimed", claims, "train") == [100, 50, 1_000_000, 80]
    with pytest.raises(ValueError, match="needs the server-side partition sizes"):
        capped_weights("partition", claims, "train")


def test_a_server_without_the_training_split_caps_at_the_median_claim(tmp_path: Path) -> None:
    from pipeline.data import DataError
    from server.strategies import _Accepted

    strategy = build_strategy(config_from_dict(tiny(tmp_path)))

    def no_data(split: str, pid: int) -> int:
        raise DataError("no training split here")

    strategy._size_of = no_data
    accepted = [_Accepted(1000 + i, i, None, {"num-examples": n}) for i, n in enumerate([10, 30, 20, 10**6, 25])]
    assert strategy._cap_weights(accepted, "train") == 2  # 30 and 10**6 lowered to the median claim, 25
    assert [a.metrics["num-examples"] for a in accepted] == [10, 25, 20, 25, 25] and strategy.weight_rule == "median"


# ------------------------------------------------------------------------------------ update screen
def _replies(base: dict[str, torch.Tensor], scales: list[float]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in scales:
        out.append({k: base[k] + s * torch.randn(v.shape, generator=gen).abs() if k.endswith("running_var")
                    else base[k] + s * torch.randn(v.shape, generator=gen) for k, v in base.items()})
    return out


def test_clip_bounds_each_update_to_factor_times_the_median_and_keeps_the_rest() -> None:
    base = bn_state()
    replies = _replies(base, [1.0, 1.1, 0.9, 1.05, 50.0])
    norms = [update_norms(base, r) for r in replies]
    results = screen_updates(base, replies, "clip", factor=2.0)
    assert [r.action for r in results] == ["kept"] * 4 + ["clipped"]
    for r, reply in zip(results[:4], replies[:4], strict=True):
        assert all(torch.equal(r.state[k], reply[k]) for k in reply)
    median = sorted(n["parameters"] for n in norms)[2]
    clipped = update_norms(base, results[4].state)
    assert clipped["parameters"] == pytest.approx(2.0 * median, rel=1e-5)
    assert clipped["bn statistics"] == pytest.approx(2.0 * sorted(n["bn statistics"] for n in norms)[2], rel=1e-5)
    direction = torch.cosine_similarity((results[4].state["0.weight"] - base["0.weight"]).flatten(),
                                        (replies[4]["0.weight"] - base["0.weight"]).flatten(), dim=0)
    assert direction.item() == pytest.approx(1.0, abs=1e-5)
    assert (results[4].state["1.running_var"] >= 0).all()  # a convex step between two valid variances


def test_bn_statistics_are_outside_the_parameter_norm_and_bounded_on_their_own() -> None:
    base = bn_state()
    replies = _replies(base, [1.0, 1.0, 1.0])
    replies[0]["1.running_mean"] = base["1.running_mean"] + 1e4  # only the BN statistics are hostile
    results = screen_updates(base, replies, "clip", factor=1.5)
    assert update_norms(base, replies[0])["parameters"] == update_norms(base, results[0].state)["parameters"]
    assert torch.equal(results[0].state["0.weight"], replies[0]["0.weight"])
    assert update_norms(base, results[0].state)["bn statistics"] < 1e3


def test_drop_refuses_with_a_reason_and_off_passes_everything() -> None:
    base = bn_state()
    replies = _replies(base, [1.0, 1.0, 1.0, 30.0])
    dropped = screen_updates(base, replies, "drop", factor=3.0)
    assert [r.action for r in dropped] == ["kept"] * 3 + ["dropped"]
    assert dropped[3].state is None and "exceeds" in dropped[3].reason and "3 x the round's median" in dropped[3].reason
    assert [r.action for r in screen_updates(base, replies, "off", 1.5)] == ["kept"] * 4
    with pytest.raises(ValueError, match="centred, clip, drop, off"):
        screen_updates(base, replies, "trim", 1.5)


def test_huge_finite_updates_clip_without_overflow() -> None:
    base = bn_state()
    replies = _replies(base, [1.0, 1.0, 1.0])
    replies[2]["0.weight"] = torch.full_like(base["0.weight"], 3e38)
    result = screen_updates(base, replies, "clip", factor=2.0)[2]
    assert result.action == "clipped" and torch.isfinite(result.state["0.weight"]).all()


def directed(n: int, noise: float = 1.0, flip: dict[int, float] | None = None, seed: int = 0,
             ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base state and ``n`` replies whose updates share a common direction plus per-client noise (IID-like);
    ``flip`` maps a reply index to a multiplier (e.g. -5: the sign-flipped x5 attacker). BN statistics honest."""
    gen = torch.Generator().manual_seed(seed)
    base = {"fc.weight": torch.zeros(40, 50), "fc.bias": torch.zeros(40),
            "bn.running_mean": torch.zeros(40), "bn.running_var": torch.ones(40)}
    common = {k: torch.randn(v.shape, generator=gen) for k, v in base.items() if k.startswith("fc")}
    replies = []
    for i in range(n):
        scale = (flip or {}).get(i, 1.0)
        reply = {k: base[k] + scale * (c + noise * torch.randn(c.shape, generator=gen)) for k, c in common.items()}
        reply["bn.running_mean"] = 0.1 * torch.randn(40, generator=gen)
        reply["bn.running_var"] = 1 + 0.1 * torch.rand(40, generator=gen)
        replies.append(reply)
    return base, replies


def test_the_direction_check_drops_a_sign_flipped_update_and_keeps_every_honest_one() -> None:
    for flip in (-5.0, -1.0):  # x5 is also clipped by norm; x1 is a normal-sized update only its direction gives away
        base, replies = directed(5, flip={4: flip})
        results = screen_updates(base, replies, "clip", 1.5, direction="drop")
        assert [r.action for r in results[:4]] == ["kept"] * 4 and results[4].action == "dropped"
        agreement, _ = round_agreement([r.cosine for r in results])
        assert results[4].state is None and "points against the other replies' coordinate-wise median" in \
            results[4].reason and "x the round's agreement" in results[4].reason
        assert results[4].cosine < -0.5 * agreement < 0 < min(r.cosine for r in results[:4])
        assert all(torch.equal(r.state[k], reply[k]) for r, reply in zip(results[:4], replies, strict=False)
                   for k in reply)
        off = screen_updates(base, replies, "clip", 1.5, direction="off")
        assert off[4].action != "dropped" and off[4].cosine is None  # the off switch: only the norm screen acts
    with pytest.raises(ValueError, match="direction must be drop, off"):
        screen_updates(base, replies, "clip", 1.5, direction="flip")


def top_k(base: dict[str, torch.Tensor], replies: list[dict[str, torch.Tensor]], frac: float
          ) -> list[dict[str, torch.Tensor]]:
    """The replies as the server decodes them after a top-k upload (parameters only; BN statistics dense)."""
    chain = parse_chain([f"topk(frac={frac})"])
    return [{k: base[k] + chain.decode(chain.encode(v - base[k], CodecContext(round=1, partition=i).named(k)))
             .view(v.shape) if k.startswith("fc") else v for k, v in reply.items()} for i, reply in enumerate(replies)]


def test_the_direction_threshold_follows_the_round_so_a_flipped_top_k_update_is_dropped_too() -> None:
    """Decoded top-k 10% updates: every cosine ~4x smaller than dense (the attacker's -0.10 is above the
    earlier absolute -0.2 and the agreement 0.05 below its 0.1), yet it is as far out relative to the round."""
    base, replies = directed(5, noise=2.0, flip={4: -1.0})
    for updates in (replies, top_k(base, replies, 0.1)):
        results = screen_updates(base, updates, "clip", 1.5, direction="drop")
        assert [r.action for r in results] == ["kept"] * 4 + ["dropped"], [r.cosine for r in results]
    assert -0.2 < results[4].cosine and round_agreement([r.cosine for r in results])[0] < 0.1  # the sparse round


def test_the_direction_check_needs_four_replies_and_a_round_that_agrees() -> None:
    base, replies = directed(3, flip={2: -1.0})  # with 3 replies one attacker is half of the others' median
    assert [r.action for r in screen_updates(base, replies, "clip", 1.5, direction="drop")] == ["kept"] * 3
    base, replies = directed(5, noise=20.0, flip={4: -1.0})  # no shared direction (strongly non-IID-like)
    results = screen_updates(base, replies, "clip", 1.5, direction="drop")
    agreement, agrees = round_agreement([r.cosine for r in results])
    assert 0 < agreement and not agrees and "dropped" not in [r.action for r in results]
    # the spread gate alone keeps them: without it (and without the floor) a near-zero agreement puts the bar at ~0
    loose = screen_updates(base, replies, "clip", 1.5, direction="drop", min_agreement=0.0,
                           agreement_over_spread=0.0)
    assert "dropped" in [r.action for r in loose]
    assert "dropped" not in [r.action for r in screen_updates(base, replies, "clip", 1.5, direction="drop",
                                                              min_agreement=0.0)]


def test_the_gate_sets_the_lowest_cosine_aside_and_asks_the_rest_to_agree() -> None:
    """Measured rounds: honest 1-step updates (two honest replies far below the median) vs a flipped attacker under
    top-k 10% whose pull widened the spread of all five; only the attacked round opens the check."""
    assert round_agreement([0.066, 0.068, -0.108, -0.046, 0.049, 0.049]) == (0.049, False)
    assert round_agreement([0.086, 0.012, 0.036, 0.075, -0.060]) == (0.036, True)
    assert round_agreement([0.086, 0.012, 0.036, 0.075, -0.060], min_agreement=0.05)[1] is False


def test_top_k_sparse_honest_updates_pass_the_direction_check() -> None:
    """Decoded top-k 1% updates are nearly orthogonal to each other: the check must not take that for an attack."""
    for n in (4, 5, 10):
        base, replies = directed(n, seed=n)
        sparse = top_k(base, replies, 0.01)
        assert int((sparse[0]["fc.weight"] != 0).sum()) == 20  # 1% of 2,000
        results = screen_updates(base, sparse, "clip", 1.5, direction="drop")
        assert "dropped" not in [r.action for r in results], [r.cosine for r in results]


def test_centred_clip_bounds_the_distance_from_the_median_update() -> None:
    base, replies = directed(5, flip={4: -5.0})
    results = screen_updates(base, replies, "centred", 1.5, direction="off")
    assert [r.action for r in results] == ["kept"] * 4 + ["clipped"]
    rows = torch.stack([torch.cat([r["fc.weight"].flatten(), r["fc.bias"]]) for r in replies])
    centre = rows.sort(dim=0).values[2]
    bound = 1.5 * (rows - centre).norm(dim=1).median()
    moved = torch.cat([results[4].state["fc.weight"].flatten(), results[4].state["fc.bias"]])
    assert float((moved - centre).norm()) == pytest.approx(float(bound), rel=1e-4)
    assert torch.equal(results[4].state["bn.running_var"], replies[4]["bn.running_var"])  # BN: norm rule as in clip


# ------------------------------------------------------------------------------------ strategies
def tiny(tmp_path: Path, **engine) -> dict:
    """A 5-client SmallNet-3 run on a slice of the embedded subset (seconds)."""
    return {
        "name": "screen", "seed": 1, "device": "cpu", "output": str(tmp_path),
        "data": {"train_limit": 160, "test_limit": 50, "augment": False, "partition": {"kind": "iid"}},
        "model": {"name": "smallnet3"},
        "engine": {"kind": "flower", "rounds": 1, "clients": 5, "min_train_nodes": 1, **engine},
        "train": {"batch_size": 16, "lr": 0.05, "max_batches": 1, "eval_batch_size": 50},
    }


def test_bulyan_refuses_too_few_expected_replies_and_multikrum_averages_n_minus_f(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bulyan needs at least 4\*krum_byzantine\+3 = 7 replies per round"):
        config_from_dict(tiny(tmp_path, strategy="bulyan", krum_byzantine=1))
    assert build_strategy(config_from_dict(tiny(tmp_path, strategy="bulyan", clients=7, krum_byzantine=1)))
    strategy = build_strategy(config_from_dict(tiny(tmp_path, strategy="multikrum", krum_byzantine=1)))
    assert isinstance(strategy, MultiKrum) and strategy.num_nodes_to_select == 4


def test_dp_wrappers_wrap_the_plain_strategy_and_keep_their_clipping_norm(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(tmp_path, strategy="fedmedian",
                                dp={"kind": "adaptive", "noise_multiplier": 0.0, "clipping_norm": 0.5}))
    strategy = build_strategy(cfg)
    assert isinstance(strategy, DifferentialPrivacyServerSideAdaptiveClipping)
    assert type(strategy.strategy) is FedMedian and strategy.num_sampled_clients == 5
    strategy.clipping_norm = 0.25
    saved = strategy.state_arrays()
    restored = build_strategy(cfg)
    restored.load_state_arrays(saved)
    assert restored.clipping_norm == 0.25


def history(tmp_path: Path, name: str = "screen") -> dict:
    return json.loads((tmp_path / name / "metrics.json").read_text())["history"][-1]


def test_metric_fuzz_in_train_and_evaluate_replies_never_aborts_the_run(tmp_path: Path) -> None:
    fuzz = {1: set_metric("surprise", 1.0), 2: drop_metric("num-examples"), 3: set_metric("num-examples", "many"),
            4: set_metric("partition-id", math.nan)}
    evaluate_fuzz = {1: set_metric("surprise", 2.0), 2: drop_metric("test-accuracy"),
                     3: set_metric("test-loss", "low"), 4: set_metric("test-accuracy", math.nan)}
    cfg = config_from_dict(tiny(tmp_path, evaluate_fraction=1.0, dp={"kind": "fixed", "clipping_norm": 100.0}))
    summary = run_server(LocalGrid(hostile_app(fuzz, evaluate_fuzz), 5), cfg, cfg.run_dir)
    record = history(tmp_path)
    assert (record["replies_ok"], record["replies_dropped"], record["replies_failed"]) == (2, 3, 0)
    assert (record["evaluate_replies_ok"], record["evaluate_replies_dropped"]) == (2, 3)
    assert 0.0 <= record["federated_test_accuracy"] <= 1.0 and math.isfinite(summary["test_accuracy"])


def echo_base(reply, base: dict[str, torch.Tensor]) -> None:
    """A tamper that sends the received global model back unchanged (an exactly-zero update)."""
    reply.content["arrays"] = encode_state(base)


def test_partition_claims_inflated_weights_and_zero_updates_under_dp(tmp_path: Path) -> None:
    """Round 1: node 0 claims node 1's partition (both refused: arrival order decides nothing); node 2 inflates
    num-examples (capped to its partition); node 3 echoes the global model, which Flower's DP clipping cannot
    take (dropped, not a crash). Round 2: node 4 switches to partition 0 (refused: it was accepted as 4)."""
    calls = {"n": 0}

    def switch_in_round_two(reply, _base) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            set_metric("partition-id", 0)(reply, _base)

    tampers = {0: set_metric("partition-id", 1), 2: ModelAttack(claim=10**6), 3: echo_base, 4: switch_in_round_two}
    cfg = config_from_dict(tiny(tmp_path, rounds=2, dp={"kind": "adaptive", "clipping_norm": 100.0}))
    run_server(LocalGrid(hostile_app(tampers), 5), cfg, cfg.run_dir)
    rounds = json.loads((tmp_path / "screen" / "metrics.json").read_text())["history"]
    assert [(r["replies_ok"], r["replies_dropped"], r["weights_capped"]) for r in rounds] == [(2, 3, 1), (1, 4, 1)]


def test_bulyan_aggregates_seven_replies_and_stops_clearly_below_4f_plus_3(tmp_path: Path) -> None:
    from server.strategies import TooFewReplies

    cfg = config_from_dict({**tiny(tmp_path, strategy="bulyan", clients=7, krum_byzantine=1), "name": "bulyan"})
    summary = run_server(LocalGrid(hostile_app(), 7), cfg, cfg.run_dir)
    assert history(tmp_path, "bulyan")["replies_ok"] == 7 and math.isfinite(summary["test_accuracy"])
    cfg = config_from_dict({**tiny(tmp_path, strategy="bulyan", clients=7, krum_byzantine=1), "name": "short"})
    with pytest.raises(TooFewReplies, match=r"only 6 valid replies \(0 failed, 1 dropped\), need 7 .*bulyan"):
        run_server(LocalGrid(hostile_app({3: set_metric("train-loss", math.inf)}), 7), cfg, cfg.run_dir)
