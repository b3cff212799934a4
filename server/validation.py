"""Reply validation before aggregation: nothing a client sends reaches a Flower strategy unchecked.

A train reply is accepted only when it holds exactly one ArrayRecord (named ``arrays``) and one
MetricRecord, the ArrayRecord has exactly the global trainable state's keys, every array has the expected
shape and the transport dtype the server asked for, its data really is of that dtype (a NumPy-serialised
``Array`` whose payload dtype differs from its declared dtype is refused), every value is finite and every
BN ``running_var`` is >= 0. ``num_batches_tracked`` never travels (``models.state.trainable_state``), so a
reply that carries it is refused as an unexpected key.

Metrics are rebuilt (:func:`clean_metrics`): the server keeps exactly the keys it expects, each a finite
number in its range, so Flower's metric aggregation never sees an extra, missing or non-numeric key.
An evaluate reply holds exactly one MetricRecord and nothing else. Every refusal is a one-line reason that
the strategy logs next to the node id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from pipeline.config import RunConfig, TransportConfig, communicate_mode
from pipeline.transport.compact_space import LIFT_RESIDUAL_KEY
from pipeline.transport.wire import RAW_STYPE, WIRE_DTYPES, decode_array, record_to_update

WEIGHT_KEY = "num-examples"
PARTITION_KEY = "partition-id"
NUMPY_STYPE = "numpy.ndarray"
#: metric key -> kind of value (``count``: whole number > 0, ``loss``: >= 0, ``fraction``: in [0, 1]).
TRAIN_METRICS = {WEIGHT_KEY: "count", "train-loss": "loss", "train-accuracy": "fraction"}
EVALUATE_METRICS = {WEIGHT_KEY: "count", "test-loss": "loss", "test-accuracy": "fraction"}


def train_metrics(cfg: RunConfig) -> dict[str, str]:
    """The train reply metrics of this run: :data:`TRAIN_METRICS`, plus the nodes' largest lift residual when
    ExpandNet layers travel compact (``transport.communicate: compact``)."""
    if communicate_mode(cfg) == "compact":
        return {**TRAIN_METRICS, LIFT_RESIDUAL_KEY: "loss"}
    return dict(TRAIN_METRICS)


class ReplyRejected(ValueError):
    """A reply the server refuses; the message is the one-line reason that is logged with the node id."""


@dataclass(frozen=True)
class ArraySpec:
    """Expected shape and wire dtype string of one array of a reply."""

    shape: tuple[int, ...]
    dtype: str


def expected_layout(global_state: dict[str, torch.Tensor], transport_dtype: str) -> dict[str, ArraySpec]:
    """Key -> (shape, wire dtype) every reply must match, from the global state and the transport dtype."""
    if transport_dtype not in WIRE_DTYPES:
        raise ValueError(f"transport.dtype must be one of {sorted(WIRE_DTYPES)}, got {transport_dtype!r}")
    wire = WIRE_DTYPES[transport_dtype]
    return {k: ArraySpec(tuple(v.shape), wire if v.is_floating_point() else str(v.dtype).removeprefix("torch."))
            for k, v in global_state.items()}


def check_reply(content: RecordDict, layout: dict[str, ArraySpec], arrays_key: str = "arrays"
                ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(decoded fp32 state, None) for a train reply with a valid layout and weight, else (None, reason)."""
    try:
        return check_train_arrays(content, layout, arrays_key), None
    except ReplyRejected as exc:
        return None, str(exc)


def _train_reply_arrays(content: RecordDict, arrays_key: str) -> ArrayRecord:
    """The one ArrayRecord of a train reply whose structure and example count check out; raises ReplyRejected."""
    records = content.array_records
    if set(records) != {arrays_key}:
        raise ReplyRejected(f"expected exactly one ArrayRecord named {arrays_key!r}, got {sorted(records)}")
    if set(content) != {arrays_key, *content.metric_records}:
        raise ReplyRejected(f"unexpected ConfigRecord(s) {sorted(content.config_records)}")
    _check_value(WEIGHT_KEY, _one_metric_record(content).get(WEIGHT_KEY), "count")
    return records[arrays_key]


def check_train_arrays(content: RecordDict, layout: dict[str, ArraySpec], arrays_key: str = "arrays"
                       ) -> dict[str, torch.Tensor]:
    """The decoded fp32 state of a train reply (structure, weight, arrays, BN variances); raises ReplyRejected."""
    record = _train_reply_arrays(content, arrays_key)
    state = decode_arrays(record, layout)
    check_bn_variances(state)
    return state


def check_train_update(content: RecordDict, base: dict[str, torch.Tensor], transport: TransportConfig,
                       server_round: int, arrays_key: str = "arrays") -> dict[str, torch.Tensor]:
    """The decoded fp32 state ``base + update`` of a train reply carrying an encoded update (structure, weight,
    header, parts, BN variances); raises ReplyRejected naming what does not decode."""
    record = _train_reply_arrays(content, arrays_key)
    layout = {k: tuple(v.shape) for k, v in base.items()}
    try:
        update = record_to_update(record, transport, layout, server_round)
    except ValueError as exc:
        raise ReplyRejected(f"encoded update does not decode: {exc}") from None
    state = {k: base[k].float() + update[k] for k in layout}
    for key, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ReplyRejected(f"array {key!r}: base + update overflows to non-finite values")
        if key.rsplit(".", 1)[-1] == "running_var":  # a cast BN update may round a tiny variance below 0
            tensor.clamp_(min=0.0)
    return state


def check_evaluate_content(content: RecordDict) -> MetricRecord:
    """The MetricRecord of an evaluate reply, which must carry nothing else; raises ReplyRejected."""
    if content.array_records or content.config_records:
        raise ReplyRejected(f"an evaluate reply carries only metrics, got {sorted(content)}")
    return _one_metric_record(content)


def _one_metric_record(content: RecordDict) -> MetricRecord:
    metrics = content.metric_records
    if len(metrics) != 1:
        raise ReplyRejected(f"expected exactly one MetricRecord, got {len(metrics)}")
    return next(iter(metrics.values()))


def decode_arrays(record: ArrayRecord, layout: dict[str, ArraySpec]) -> dict[str, torch.Tensor]:
    """Every array of ``record`` decoded (floating ones to fp32) after checking it against ``layout``."""
    missing = [k for k in layout if k not in record]
    extra = [k for k in record if k not in layout]
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise ReplyRejected(f"{what} ({len(missing)} missing, {len(extra)} unexpected)")
    return {key: decode_checked(key, record[key], spec) for key, spec in layout.items()}


def decode_checked(key: str, array: Array, spec: ArraySpec) -> torch.Tensor:
    """One array, refused unless header and data both have ``spec``'s shape and dtype and all values are finite."""
    if tuple(array.shape) != spec.shape:
        raise ReplyRejected(f"array {key!r}: shape {tuple(array.shape)}, expected {spec.shape}")
    if array.dtype != spec.dtype:
        raise ReplyRejected(f"array {key!r}: dtype {array.dtype}, expected {spec.dtype}")
    if array.stype not in (RAW_STYPE, NUMPY_STYPE):
        raise ReplyRejected(f"array {key!r}: unknown serialisation {array.stype!r}")
    if array.stype == NUMPY_STYPE:
        _check_numpy_payload(key, array, spec)
    try:
        tensor = decode_array(array)
    except (ValueError, TypeError, OSError) as exc:
        raise ReplyRejected(f"array {key!r}: cannot decode ({exc})") from None
    if tuple(tensor.shape) != spec.shape:
        raise ReplyRejected(f"array {key!r}: data has shape {tuple(tensor.shape)}, header says {spec.shape}")
    if tensor.is_floating_point():
        tensor = tensor.float()
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ReplyRejected(f"array {key!r}: {bad} non-finite values")
    return tensor


def _check_numpy_payload(key: str, array: Array, spec: ArraySpec) -> None:
    """A NumPy-serialised Array must hold data of its declared dtype and shape (bf16 has no NumPy form)."""
    try:
        data = array.numpy()
    except (ValueError, TypeError, OSError, EOFError) as exc:
        raise ReplyRejected(f"array {key!r}: cannot decode ({exc})") from None
    if str(data.dtype) != spec.dtype or data.dtype.byteorder not in ("=", "<", "|"):
        raise ReplyRejected(f"array {key!r}: data dtype {data.dtype.str}, declared {array.dtype}")
    if not isinstance(data, np.ndarray) or tuple(data.shape) != spec.shape:
        raise ReplyRejected(f"array {key!r}: data has shape {tuple(np.shape(data))}, header says {spec.shape}")


def check_bn_variances(state: dict[str, torch.Tensor]) -> None:
    """BatchNorm running variances must be >= 0 (a negative one makes the deployed model emit NaNs)."""
    for key, tensor in state.items():
        if key.rsplit(".", 1)[-1] == "running_var" and bool((tensor < 0).any()):
            raise ReplyRejected(f"array {key!r}: {int((tensor < 0).sum())} negative BN variances")


def clean_metrics(metrics: MetricRecord, expected: dict[str, str]) -> dict[str, float | int]:
    """Exactly the ``expected`` metric keys, each a finite number in its range; raises ReplyRejected."""
    return {key: _check_value(key, metrics.get(key), kind) for key, kind in expected.items()}


def partition_of(metrics: MetricRecord, num_partitions: int) -> int:
    """The reply's claimed ``partition-id``: a whole number in ``0..num_partitions-1``; raises ReplyRejected."""
    value = metrics.get(PARTITION_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ReplyRejected(f"metric {PARTITION_KEY!r} missing or not a whole number (got {value!r})")
    if not 0 <= value < num_partitions:
        raise ReplyRejected(f"metric {PARTITION_KEY!r} = {value} outside 0..{num_partitions - 1}")
    return int(value)


def _check_value(key: str, value: object, kind: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyRejected(f"metric {key!r} missing or not a number (got {type(value).__name__})")
    if not math.isfinite(value):
        raise ReplyRejected(f"metric {key!r} is not finite ({value})")
    if kind == "count":
        if value <= 0 or not float(value).is_integer():
            raise ReplyRejected(f"metric {key!r} must be a positive whole number, got {value}")
        return int(value)
    if kind == "loss" and value < 0:
        raise ReplyRejected(f"metric {key!r} must be >= 0, got {value}")
    if kind == "fraction" and not 0 <= value <= 1:
        raise ReplyRejected(f"metric {key!r} must be in [0, 1], got {value}")
    return float(value)
