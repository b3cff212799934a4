"""The wire format (``pipeline.transport.wire``): exact payload sizes, round trips, and what each model sends."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord

import models
from pipeline.transport.wire import decode_record, encode_state, record_nbytes, to_numpy_record


# ----------------------------------------------------------------------------------------------- codec
@pytest.mark.parametrize(("dtype", "itemsize", "tol"), [("fp32", 4, 0.0), ("fp16", 2, 1e-3), ("bf16", 2, 1e-2)])
def test_codec_round_trip_and_exact_payload_size(dtype: str, itemsize: int, tol: float) -> None:
    state = models.trainable_state(models.build("smallnet3", num_classes=10))
    record = encode_state(state, dtype)
    numel = sum(v.numel() for v in state.values())
    assert record_nbytes(record) == numel * itemsize + sum(len(k) for k in state)
    assert record_nbytes(record) == record.count_bytes()  # Flower's own measure
    back = decode_record(record)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == torch.float32 and back[k].shape == v.shape
        torch.testing.assert_close(back[k], v.float(), atol=tol * max(1.0, v.abs().max().item()), rtol=tol)


def test_codec_rejects_truncated_buffer_and_reads_flower_numpy_arrays() -> None:
    record = encode_state({"w": torch.ones(4, 3)}, "bf16")
    broken = ArrayRecord({"w": Array(dtype="bfloat16", shape=(4, 3), stype=record["w"].stype,
                                     data=record["w"].data[:-2])})
    with pytest.raises(ValueError, match="needs 24"):
        decode_record(broken)
    numpy_record = to_numpy_record({"w": torch.arange(6.0).view(2, 3)})
    assert numpy_record["w"].stype == "numpy.ndarray"
    torch.testing.assert_close(decode_record(numpy_record)["w"], torch.arange(6.0).view(2, 3))


# -------------------------------------------------------------------------------------- communication
def test_resnet56_csg_upload_shrinks_by_the_parameter_ratio() -> None:
    dense = models.build("resnet56", num_classes=10)
    csg = models.csg_compress(dense, slice_shape=(16, 16, 3, 3), code_size=128)
    assert (models.count_params(dense), models.count_params(csg)) == (853_018, 347_162)
    up_dense = record_nbytes(encode_state(models.trainable_state(dense)))
    up_csg = record_nbytes(encode_state(models.trainable_state(csg)))
    ratio = up_dense / up_csg
    assert abs(ratio / (853_018 / 347_162) - 1) < 0.02, ratio
    frozen = models.csg_compress(dense, slice_shape=(16, 16, 3, 3), code_size=128, train_generator=False)
    sent = encode_state(models.trainable_state(frozen))
    trained_keys = set(models.trainable_state(csg))
    generator_keys = trained_keys - set(sent)
    assert generator_keys and all("generator" in k for k in generator_keys), "a frozen generator never travels"
    assert up_csg - record_nbytes(sent) >= 4 * 16 * 16 * 9 * 128  # the whole fp32 generator stays home


def test_expandnet_factors_travel_and_cost_more_than_the_compact_net() -> None:
    net = models.build("smallnet7", num_classes=10)
    expanded = models.expand(net, "ck", rate=4)
    compact, wide = (record_nbytes(encode_state(models.trainable_state(m))) for m in (net, expanded))
    assert wide > 2 * compact  # the cost of training expanded: reported, not hidden
