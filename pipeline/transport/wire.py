"""What a Flower message carries: model state <-> ``ArrayRecord`` (fp32 / fp16 / bf16) and the run config.

Both the ClientApp and the ServerApp use this one codec, so bytes are counted on exactly the payload that
travels. An encoded update (:mod:`pipeline.transport.update`) travels as one raw uint8 Array (``update``):
the JSON header (format version, codec chain, dtype, layout digest) that the receiver checks before decoding,
then each tensor's encoded parts back to back in sorted name order. Names, shapes and per-part metadata stay home:
both sides know them from the model, and on a ~8 KB low-rank update they were ~20% of the message. A state
(the downlink's full model, dense replies) travels as one Array per tensor. On the wire each tensor is one
``Array`` whose ``data`` is the raw little-endian buffer
(``stype="compactfl.raw"``; dtype and shape travel in the Array's own fields), so the payload is exactly
``numel * itemsize`` and no per-tensor npy header inflates small tensors. bf16 (which NumPy lacks) travels
as its 16-bit patterns. Flower's strategies aggregate NumPy-backed Arrays: the server converts valid
replies with :func:`to_numpy_record` before handing them over.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.serde import array_to_proto, message_to_proto

from models.state import cast_state
from pipeline.config import RunConfig, TransportConfig, config_from_dict
from pipeline.transport.codecs import Encoded, parse_chain
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
#: the train message's config key of the transport header a node checks before training
HEADER_KEY = "transport-header"
#: the one array of an encoded update record (header + every tensor's encoded bytes, packed)
UPDATE_KEY = "update"
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


def config_to_json(cfg: RunConfig) -> str:
    """The resolved run config as JSON (sent to clients so every node trains with the server's config)."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def config_hash(text: str) -> str:
    """Short stable name of a run config JSON (sha256 prefix)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_from_json(text: str) -> RunConfig:
    """Inverse of :func:`config_to_json` (validated again on the receiving side)."""
    raw: Any = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{CONFIG_KEY}: expected a JSON object, got {type(raw).__name__}")
    return config_from_dict(raw)


# -------------------------------------------------------------------------------------- encoded updates
def layout_digest(layout: dict[str, tuple[int, ...]]) -> str:
    """A short name of a model's tensor layout (names and shapes): sender and receiver must agree on it, since
    a packed update's tensors follow each other in sorted name order without names."""
    text = ";".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in sorted(layout.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def update_to_record(update: EncodedUpdate) -> ArrayRecord:
    """An :class:`EncodedUpdate` as an ``ArrayRecord`` holding one raw uint8 buffer under ``UPDATE_KEY``.

    The buffer is the header's length (2 bytes, little-endian), the header JSON (format version, codec chain,
    dense dtype, layout digest), then every tensor in sorted name order (the same on every node, whatever order
    a state was loaded in) as its chain's :meth:`Chain.to_bytes` image: no names, shapes or per-array
    metadata travel, since the receiver knows them from its own model.
    """
    layout = {name: tuple(enc.shape) for name, enc in update.tensors.items()}
    head = json.dumps({**update.header, "layout": layout_digest(layout)}, sort_keys=True,
                      separators=(",", ":")).encode()
    chunks = [torch.tensor(list(len(head).to_bytes(2, "little")) + list(head), dtype=torch.uint8)]
    for name in sorted(update.tensors):
        enc = update.tensors[name]
        chunks.append(parse_chain(enc.codec).to_bytes(enc).cpu())
    return ArrayRecord({UPDATE_KEY: encode_tensor(torch.cat(chunks))})


def _update_buffer(record: ArrayRecord) -> torch.Tensor:
    """The packed buffer of an untrusted update record (exactly one raw 1-D uint8 Array)."""
    keys = list(record.keys())
    if keys != [UPDATE_KEY]:
        raise ValueError(f"encoded update: expected the one array {UPDATE_KEY!r}, got {len(keys)} array(s) "
                         f"{[str(k)[:40] for k in keys[:3]]}")
    array = record[UPDATE_KEY]
    if array.stype != RAW_STYPE or array.dtype != "uint8" or len(array.shape) != 1:
        raise ValueError(f"encoded update: {UPDATE_KEY!r} must be a 1-D raw uint8 buffer")
    return decode_array(array)


def _read_header(data: torch.Tensor) -> tuple[Any, int]:
    """The header object at the start of a packed buffer and where the tensors begin."""
    if data.numel() < 2:
        raise ValueError("transport header: the buffer ends before the header's length")
    size = int(data[0]) | (int(data[1]) << 8)
    if size > MAX_HEADER_BYTES or 2 + size > data.numel():
        raise ValueError(f"transport header: {size} bytes claimed, at most {MAX_HEADER_BYTES} and within the buffer")
    try:
        return json.loads(bytes(data[2:2 + size].tolist()).decode()), 2 + size
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("transport header: not valid JSON") from None


def _split_update(data: torch.Tensor, transport: TransportConfig, layout: dict[str, tuple[int, ...]], round: int,
                  ) -> tuple[dict[str, Any], dict[str, Encoded], dict[str, int]]:
    """The checked header, the encoded tensors and each tensor's byte count of a packed buffer (ValueError
    naming the culprit)."""
    received, pos = _read_header(data)
    check_header(received, transport, round)
    if received.get("layout") != layout_digest(layout):
        raise ValueError(f"transport header: layout {received.get('layout')!r} is not this model's "
                         f"{layout_digest(layout)!r} (a different model or version)")
    tensors, sizes = {}, {}
    for name, shape in sorted(layout.items()):
        try:
            tensors[name], end = tensor_chain(name, transport, round).read_bytes(data, pos, tuple(shape))
        except ValueError as exc:
            raise ValueError(f"update tensor {name!r}: {exc}") from None
        sizes[name], pos = end - pos, end
    if pos != data.numel():
        raise ValueError(f"update tensor {max(layout)!r}: {data.numel() - pos} bytes follow the last tensor")
    return received, tensors, sizes


def record_to_encoded(record: ArrayRecord, transport: TransportConfig, layout: dict[str, tuple[int, ...]],
                      round: int) -> EncodedUpdate:
    """The :class:`EncodedUpdate` of an untrusted packed record, split but not decoded (header checked); the
    inverse of :func:`update_to_record`. Malformed input is a one-line ValueError naming the header or tensor."""
    received, tensors, _ = _split_update(_update_buffer(record), transport, layout, round)
    head = {k: v for k, v in received.items() if k != "layout"}
    return EncodedUpdate(tensors, {name: tensor_group(name, transport) for name in tensors}, head)


def record_to_update(record: ArrayRecord, transport: TransportConfig, layout: dict[str, tuple[int, ...]],
                     round: int) -> dict[str, torch.Tensor]:
    """fp32 tensors of ``layout`` from an untrusted record of :func:`update_to_record`.

    The header must match ``transport`` for ``round`` and the receiver's layout; each tensor must fill exactly
    its chain's parts. Anything else is a one-line ValueError naming the header or the tensor.
    """
    encoded = record_to_encoded(record, transport, layout, round)
    return decode_update({name: enc.parts for name, enc in encoded.tensors.items()}, transport, layout, round)


def record_group_nbytes(record: ArrayRecord, transport: TransportConfig, layout: dict[str, tuple[int, ...]],
                        round: int) -> dict[str, int]:
    """Serialised bytes of a reply's record per tensor group (``codec``/``excluded``/``bn``/``header``).

    A state record (one Array per tensor) counts each Array's protobuf size plus its key for its tensor. A
    packed update counts each tensor's encoded bytes, and the header, key and Array metadata as ``header``;
    one that does not parse counts whole as ``unparsed``."""
    sizes = {k: int(array_to_proto(a).ByteSize()) + len(k.encode()) for k, a in record.items()}
    out: dict[str, int] = defaultdict(int)
    if UPDATE_KEY not in record:
        for key, size in sizes.items():
            out[tensor_group(key, transport)] += size
        return dict(out)
    try:
        _, _, tensor_bytes = _split_update(_update_buffer(record), transport, layout, round)
    except ValueError:
        return {"unparsed": sum(sizes.values())}
    for name, n in tensor_bytes.items():
        out[tensor_group(name, transport)] += n
    out["header"] = sum(sizes.values()) - sum(out.values())
    return dict(out)
