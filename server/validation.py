"""Reply validation before aggregation: a reply must carry exactly the global state's layout, finite values.

A reply is accepted only when its ArrayRecord has the same keys as the global trainable state, every array
has the expected shape and the transport dtype the server asked for, every value is finite, and its
MetricRecord holds a positive ``num-examples``. Anything else is rejected with a one-line reason that the
strategy logs next to the node id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from pipeline.transport.wire import WIRE_DTYPES, decode_array

WEIGHT_KEY = "num-examples"


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
    """(decoded fp32 state, None) for a valid reply, else (None, reason)."""
    records = content.array_records
    if set(records) != {arrays_key}:
        return None, f"expected exactly one ArrayRecord named {arrays_key!r}, got {sorted(records)}"
    metrics = content.metric_records
    if len(metrics) != 1:
        return None, f"expected exactly one MetricRecord, got {len(metrics)}"
    reason = _check_weight(next(iter(metrics.values())))
    if reason:
        return None, reason
    record: ArrayRecord = records[arrays_key]
    missing = [k for k in layout if k not in record]
    extra = [k for k in record if k not in layout]
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        return None, f"{what} ({len(missing)} missing, {len(extra)} unexpected)"
    state: dict[str, torch.Tensor] = {}
    for key, spec in layout.items():
        array = record[key]
        if tuple(array.shape) != spec.shape:
            return None, f"array {key!r}: shape {tuple(array.shape)}, expected {spec.shape}"
        if array.dtype != spec.dtype:
            return None, f"array {key!r}: dtype {array.dtype}, expected {spec.dtype}"
        try:
            tensor = decode_array(array)
        except (ValueError, TypeError, OSError) as exc:
            return None, f"array {key!r}: cannot decode ({exc})"
        if tuple(tensor.shape) != spec.shape:
            return None, f"array {key!r}: data has shape {tuple(tensor.shape)}, header says {spec.shape}"
        if tensor.is_floating_point():
            tensor = tensor.float()
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return None, f"array {key!r}: {bad} non-finite values"
        state[key] = tensor
    return state, None


def _check_weight(metrics: MetricRecord) -> str | None:
    value = metrics.get(WEIGHT_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"metric {WEIGHT_KEY!r} missing or not a number"
    if not math.isfinite(value) or value <= 0:
        return f"metric {WEIGHT_KEY!r} must be positive, got {value}"
    return None
