"""Whole updates through the transport rules (``pipeline.transport.update``) and on the Flower wire.

Per-tensor groups and their exact bytes, dense warm-up, error feedback on the codec group only, the header
check, and decoding of untrusted records: every malformed input is a ValueError naming the tensor.
"""

from __future__ import annotations

import random

import pytest
import torch
from flwr.app import Array, ArrayRecord

import models
from pipeline.config import TransportConfig
from pipeline.transport.codecs import CodecContext, parse_chain
from pipeline.transport.error_feedback import ErrorFeedback
from pipeline.transport.update import decode_encoded, downlink_rules, encode_update, tensor_group
from pipeline.transport.wire import (
    RAW_STYPE,
    UPDATE_KEY,
    record_group_nbytes,
    record_nbytes,
    record_to_update,
    update_to_record,
)

CHAIN = ["topk(frac=0.01)", "qsgd(bits=8,block=256)"]


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    """A smallnet7-shaped update (weights, biases, BN affine + running statistics, classifier)."""
    state = models.trainable_state(models.build("smallnet7", num_classes=10))
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in state.items()}


def _transport(**kw) -> TransportConfig:
    return TransportConfig(**{"codec": CHAIN, "exclude": ["*.bias", "classifier.*"], "dtype": "bf16", **kw})


def _layout(update: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in update.items()}


def test_groups_follow_the_rules_and_bytes_add_up_exactly() -> None:
    update, t = _update(), _transport()
    groups = {k: tensor_group(k, t) for k in update}
    assert groups["stages.1.0.weight"] == "codec"
    assert groups["stages.0.1.running_var"] == "bn" and groups["stages.0.1.weight"] == "codec"
    assert all(groups[k] == "excluded" for k in update if k.endswith(".bias") or k.startswith("classifier."))
    enc = encode_update(update, t, CodecContext(seed=1, round=3, partition=2))
    by_group = enc.nbytes_by_group()
    dense = {g: sum(2 * v.numel() for k, v in update.items() if groups[k] == g) for g in ("excluded", "bn")}
    assert by_group["excluded"] == dense["excluded"] and by_group["bn"] == dense["bn"]
    codec_numel = sum(v.numel() for k, v in update.items() if groups[k] == "codec")
    assert 0 < by_group["codec"] < 0.05 * 4 * codec_numel
    assert sum(by_group.values()) == enc.nbytes
    record = update_to_record(enc)
    assert list(record) == [UPDATE_KEY] and record[UPDATE_KEY].dtype == "uint8"
    data = record[UPDATE_KEY].data
    head = 2 + data[0] + 256 * data[1]  # the header's length, then the header
    assert b'"layout":' in data[2:head] and b'"format":2' in data[2:head]
    prefixes = sum(4 for e in enc.tensors.values()  # the one length per part whose size depends on the data
                   for n in parse_chain(e.codec).part_numels(1, e.shape).values() if n is None)
    assert record_nbytes(record) == head + enc.nbytes + prefixes + len(UPDATE_KEY)
    groups = record_group_nbytes(record, t, _layout(update), round=3)
    assert groups["excluded"] == by_group["excluded"] and groups["bn"] == by_group["bn"]
    assert groups["codec"] == by_group["codec"] + prefixes
    assert sum(groups.values()) > record_nbytes(record)  # the header group also holds the Array's metadata


def test_wire_round_trip_equals_in_process_decoding() -> None:
    update, t = _update(), _transport()
    enc = encode_update(update, t, CodecContext(seed=1, round=3, partition=2))
    direct = decode_encoded(enc, t, round=3)
    wired = record_to_update(update_to_record(enc), t, _layout(update), round=3)
    assert list(wired) == list(update)
    for k in update:
        assert torch.equal(wired[k], direct[k]) and wired[k].dtype == torch.float32
    torch.testing.assert_close(wired["classifier.3.weight"], update["classifier.3.weight"], rtol=2**-8, atol=0)


def test_dense_warmup_rounds_send_every_tensor_in_dtype() -> None:
    update, t = _update(), _transport(dense_warmup_rounds=2)
    warm = encode_update(update, t, CodecContext(round=2))
    assert warm.header["codec"] == "bf16"
    assert warm.nbytes == 2 * sum(v.numel() for v in update.values())
    assert encode_update(update, t, CodecContext(round=3)).header["codec"] == "topk(frac=0.01)+qsgd(bits=8,block=256)"


def test_delta_downlink_uses_its_own_chain_under_the_same_rules() -> None:
    t = _transport(downlink={"kind": "delta", "codec": ["qsgd(bits=4,block=128)"], "error_feedback": True})
    down = downlink_rules(t)
    assert down.codec == ["qsgd(bits=4,block=128)"] and down.exclude == t.exclude and down.dtype == "bf16"
    ef = ErrorFeedback()
    delta = _update(seed=1)
    enc = encode_update(delta, down, CodecContext(seed=1, round=4, partition=-1), error_feedback=ef)
    assert enc.header["codec"] == "qsgd(bits=4,block=128)"
    assert set(record_to_update(update_to_record(enc), down, _layout(delta), round=4)) == set(delta)
    with pytest.raises(ValueError, match="downlink.kind is 'full'"):
        downlink_rules(_transport())


def test_error_feedback_covers_the_codec_group_only_and_is_required_when_on() -> None:
    update, t = _update(), _transport(error_feedback=True)
    ef = ErrorFeedback()
    encode_update(update, t, CodecContext(round=1), error_feedback=ef)
    assert set(ef.residuals) == {k for k in update if tensor_group(k, t) == "codec"}
    with pytest.raises(ValueError, match="pass the node's ErrorFeedback"):
        encode_update(update, t, CodecContext(round=2))
    with pytest.raises(ValueError, match="non-finite"):
        encode_update({**update, "stages.1.0.weight": torch.full((16, 8, 7, 7), float("nan"))}, t,
                      CodecContext(round=2), error_feedback=ef)


@pytest.mark.parametrize(("receiver", "needle"), [
    (dict(codec=["topk(frac=0.02)", "qsgd(bits=8,block=256)"]), "codec 'topk\\(frac=0.01\\)"),
    (dict(dtype="fp16"), "dtype 'bf16' does not match this run's 'fp16'"),
])
def test_receiver_refuses_a_header_that_does_not_match_its_config(receiver: dict, needle: str) -> None:
    update = _update()
    record = update_to_record(encode_update(update, _transport(), CodecContext(round=3)))
    with pytest.raises(ValueError, match=needle):
        record_to_update(record, _transport(**receiver), _layout(update), round=3)
    data = bytes(record[UPDATE_KEY].data)
    old = ArrayRecord({UPDATE_KEY: Array(dtype="uint8", shape=(len(data),), stype=RAW_STYPE,
                                         data=data[:2] + b"[" + data[3:])})  # the header's opening brace garbled
    with pytest.raises(ValueError, match="not valid JSON"):
        record_to_update(old, _transport(), _layout(update), round=3)


def test_receiver_refuses_an_update_for_another_layout() -> None:
    update = _update()
    record = update_to_record(encode_update(update, _transport(), CodecContext(round=3)))
    renamed = {("head." + k if k.startswith("classifier.3") else k): v for k, v in _layout(update).items()}
    with pytest.raises(ValueError, match=r"transport header: layout '[0-9a-f]{8}' is not this model's"):
        record_to_update(record, _transport(), renamed, round=3)
    reordered = dict(reversed(list(_layout(update).items())))  # a state loaded in another order decodes the same
    torch.testing.assert_close(record_to_update(record, _transport(), reordered, round=3),
                               record_to_update(record, _transport(), _layout(update), round=3))


def _mutations(record: ArrayRecord, rng: random.Random) -> list[tuple[str, ArrayRecord]]:
    """Malformed copies of a packed update ``record``: truncated, extended, garbled (header bytes included),
    spliced buffers, a wrong dtype or shape, and foreign or missing arrays."""
    arr = record[UPDATE_KEY]
    out = []
    for _ in range(60):
        data = bytearray(arr.data)
        kind = rng.choice(["truncate", "extend", "garble", "garble-head", "splice", "dtype", "foreign", "drop"])
        if kind == "truncate":
            data = data[: rng.randrange(len(data))]
        elif kind == "extend":
            data += bytes(rng.randrange(1, 9))
        elif kind == "garble":
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "garble-head":
            data[rng.randrange(2 + data[0])] = rng.randrange(256)
        elif kind == "splice":
            at = rng.randrange(len(data))
            data = data[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5))) + data[at + 4:]
        elif kind == "dtype":
            whole = bytes(data[: len(data) // 4 * 4])
            out.append((kind, ArrayRecord({UPDATE_KEY: Array(dtype="float32", shape=(len(whole) // 4,),
                                                             stype=RAW_STYPE, data=whole)})))
            continue
        elif kind == "foreign":
            out.append((kind, ArrayRecord({UPDATE_KEY: arr, "extra": arr})))
            continue
        else:
            out.append((kind, ArrayRecord()))
            continue
        out.append((kind, ArrayRecord({UPDATE_KEY: Array(dtype="uint8", shape=(len(data),), stype=RAW_STYPE,
                                                         data=bytes(data))})))
    return out


def test_fuzzed_records_fail_only_with_value_errors_naming_the_tensor() -> None:
    update = {k: v for k, v in _update(seed=3).items() if not k.startswith("stages.0.1")}
    layout = _layout(update)
    rng = random.Random(0)
    for chain in (CHAIN, ["sign"], ["qsgd(bits=3,block=64)"], ["topk(k=50)"], ["lowrank(rank=2)", "qsgd(bits=4)"],
                  ["lowrank(rank=2,layout=kernel)", "qsgd(bits=3,block=64,rounding=nearest,entropy=deflate)"]):
        t = _transport(codec=chain)
        record = update_to_record(encode_update(update, t, CodecContext(round=5)))
        for kind, bad in _mutations(record, rng):
            try:
                out = record_to_update(bad, t, layout, round=5)
            except ValueError as exc:
                msg = str(exc)
                assert "\n" not in msg
                assert msg.startswith(("update tensor '", "transport header", "encoded update:")), (kind, msg)
            else:  # a garbled byte may still decode to a valid update: it must then be finite and well-shaped
                assert all(torch.isfinite(v).all() and v.shape == update[k].shape for k, v in out.items()), kind
