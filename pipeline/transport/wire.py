"""What a Flower message carries: model state <-> ``ArrayRecord`` (fp32 / fp16 / bf16) and the run config.

Both the ClientApp and the ServerApp use this one codec, so bytes are counted on exactly the payload that
travels. An encoded update (:mod:`pipeline.transport.update`) travels as one raw-buffer Array per encoded
part, keyed ``NAME/PART`` (``conv1.weight/values``, ``conv1.weight/indices``, ``conv1.weight/scales``), plus
one ``transport-header`` Array holding the JSON header (format version, codec chain, dtype) that the receiver
checks before decoding. On the wire each tensor is one ``Array`` whose ``data`` is the raw little-endian buffer
(``stype="compactfl.raw"``; dtype and shape travel in the Array's own fields), so the payload is exactly
``numel * itemsize`` and no per-tensor npy header inflates small tensors. bf16 (which NumPy lacks) travels
as its 16-bit patterns. Flower's strategies aggregate NumPy-backed Arrays: the server converts valid
replies with :func:`to_numpy_record` before handing them over.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.serde import array_to_proto, message_to_proto

from models.state import cast_state
from pipeline.config import RunConfig, TransportConfig, config_from_dict
from pipeline.transport.update import EncodedUpdate, check_header, decode_update, tensor_chain, tensor_group

RAW_STYPE = "compactfl.raw"
#: wire dtype string -> (numpy dtype of the raw buffer, torch dtype it decodes to)
_RAW = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    "float64": (np.dtype("<f8"), torch.float64),
    "int64": (np.dtype("<i8"), torch.int64),
    "uint8": (np.dtype("u1"), torch.uint8),
}
_TORCH_TO_WIRE = {torch_dtype: name for name, (_, torch_dtype) in _RAW.items()}
#: Array.dtype string of each transport dtype of ``transport.dtype``.
WIRE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CONFIG_KEY = "compactfl-config"
#: every message's config names the run config by this hash; the JSON itself travels once per node
CONFIG_HASH_KEY = "compactfl-config-hash"
#: the start of a node's error reason when it lacks the run config a message names (the server resends it)
CONFIG_MISSING = "run config missing"
HEADER_KEY = "transport-header"
#: largest header accepted from a peer (a JSON object of three short fields).
MAX_HEADER_BYTES = 4096
#: a train message's learning rates, one per local epoch, from the run's schedule on the global epoch count
LRS_KEY = "compactfl-lrs"
#: every train/evaluate message's run key: the run a node's stored state belongs to (``node_store.check_run_key``)
RUN_KEY = "compactfl-run-key"


def encode_tensor(tensor: torch.Tensor) -> Array:
    """One tensor as a raw-buffer ``Array`` (dtype name + shape + little-endian bytes)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype not in _TORCH_TO_WIRE:
        raise TypeError(f"cannot send a {t.dtype} tensor (supported: {sorted(_RAW)})")
    name = _TORCH_TO_WIRE[t.dtype]
    raw = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    data = raw.astype(_RAW[name][0], copy=False).tobytes()
    return Array(dtype=name, shape=tuple(int(d) for d in t.shape), stype=RAW_STYPE, data=data)


def encode_state(state: dict[str, torch.Tensor], transport_dtype: str = "fp32") -> ArrayRecord:
    """An ``ArrayRecord`` of raw-buffer Arrays holding ``state`` cast to ``transport_dtype`` (state order)."""
    record = ArrayRecord()
    for key, tensor in cast_state(state, transport_dtype).items():
        record[key] = encode_tensor(tensor)
    return record


def decode_array(array: Array) -> torch.Tensor:
    """One ``Array`` (raw-buffer or Flower's NumPy format) back to a tensor in its wire dtype."""
    if array.stype != RAW_STYPE:
        return torch.from_numpy(np.array(array.numpy(), copy=True))
    if array.dtype not in _RAW:
        raise ValueError(f"unsupported wire dtype {array.dtype!r}")
    np_dtype, torch_dtype = _RAW[array.dtype]
    shape = tuple(array.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(array.data) != expected:
        raise ValueError(f"buffer holds {len(array.data)} bytes, shape {shape} x {array.dtype} needs {expected}")
    values = torch.from_numpy(np.frombuffer(array.data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
                              .reshape(shape))
    return values.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else values


def decode_record(record: ArrayRecord, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Tensors of an ``ArrayRecord``, cast to ``dtype`` (None keeps the wire dtype)."""
    out = {}
    for key, array in record.items():
        t = decode_array(array)
        out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def to_numpy_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Flower's NumPy-backed ``ArrayRecord`` (what its strategies aggregate) of an fp32 state."""
    return ArrayRecord({k: Array(v.detach().cpu().float().contiguous().numpy()) for k, v in state.items()})


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ``ArrayRecord`` as Flower counts them (``count_bytes``: buffers + key names)."""
    return int(record.count_bytes())


def message_nbytes(msg: Message) -> int:
    """Bytes of a whole Message as Flower serialises it (protobuf: metadata, every record, array metadata).

    A message that Flower could not serialise (a hand-made record with a value type Flower refuses, as the
    in-process test grid lets through) counts its array records' payload bytes only."""
    try:
        return int(message_to_proto(msg).ByteSize())
    except (TypeError, ValueError):
        return sum(int(r.count_bytes()) for r in msg.content.array_records.values()) if msg.has_content() else 0


def record_group_nbytes(record: ArrayRecord, transport: TransportConfig) -> dict[str, int]:
    """Serialised bytes of an ArrayRecord per tensor group (``codec``/``excluded``/``bn``/``header``): each
    Array's protobuf size (buffer + dtype, shape, stype) plus its key; encoded parts count for their tensor."""
    out: dict[str, int] = defaultdict(int)
    for key, array in record.items():
        name = key.rpartition("/")[0] if "/" in key else key
        group = "header" if key == HEADER_KEY else tensor_group(name, transport)
        out[group] += int(array_to_proto(array).ByteSize()) + len(key.encode())
    return dict(out)


def config_to_json(cfg: RunConfig) -> str:
    """The resolved run config as JSON (sent to clients so every node trains with the server's config)."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def config_hash(text: str) -> str:
    """Short stable name of a run config JSON (sha256 prefix)."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_from_json(text: str) -> RunConfig:
    """Inverse of :func:`config_to_json` (validated again on the receiving side)."""
    raw: Any = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{CONFIG_KEY}: expected a JSON object, got {type(raw).__name__}")
    return config_from_dict(raw)


# -------------------------------------------------------------------------------------- encoded updates
def update_to_record(update: EncodedUpdate) -> ArrayRecord:
    """An :class:`EncodedUpdate` as an ``ArrayRecord``: the header, then ``NAME/PART`` raw Arrays."""
    record = ArrayRecord()
    head = json.dumps(update.header, sort_keys=True).encode()
    record[HEADER_KEY] = encode_tensor(torch.frombuffer(bytearray(head), dtype=torch.uint8))
    for name, enc in update.tensors.items():
        for part, tensor in enc.parts.items():
            record[f"{name}/{part}"] = encode_tensor(tensor)
    return record


def record_to_update(record: ArrayRecord, transport: TransportConfig, layout: dict[str, tuple[int, ...]],
                     round: int) -> dict[str, torch.Tensor]:
    """fp32 tensors of ``layout`` from an untrusted record of :func:`update_to_record`.

    The header must match ``transport`` for ``round``; each tensor must carry exactly its chain's parts in
    their dtypes. Anything else is a one-line ValueError naming the header, key or tensor.
    """
    if HEADER_KEY not in record:
        raise ValueError(f"encoded update lacks its {HEADER_KEY!r}")
    head = record[HEADER_KEY]
    if head.stype != RAW_STYPE or head.dtype != "uint8" or len(head.data) > MAX_HEADER_BYTES:
        raise ValueError(f"{HEADER_KEY}: expected a raw uint8 buffer of at most {MAX_HEADER_BYTES} bytes")
    try:
        received = json.loads(bytes(head.data).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{HEADER_KEY}: not valid JSON") from None
    check_header(received, transport, round)
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, array in record.items():
        if key == HEADER_KEY:
            continue
        name, sep, part = key.rpartition("/")
        if not sep or name not in layout:
            raise ValueError(f"encoded update: unexpected key {key!r}")
        want = tensor_chain(name, transport, round).part_dtypes()
        if part not in want:
            raise ValueError(f"update tensor {name!r}: unexpected part {part!r}")
        if array.stype != RAW_STYPE or array.dtype not in _RAW or _RAW[array.dtype][1] != want[part] \
                or len(array.shape) != 1:
            raise ValueError(f"update tensor {name!r}: part {part!r} must be a 1-D raw {want[part]} buffer")
        try:
            parts[name][part] = decode_array(array)
        except ValueError as exc:
            raise ValueError(f"update tensor {name!r}: part {part!r}: {exc}") from None
    return decode_update(dict(parts), transport, layout, round)
