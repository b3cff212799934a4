"""A whole model update through the ``transport`` rules: which tensor takes which codec, and its bytes.

Per-tensor rules (``transport`` section of the run config):

- ``bn``: BatchNorm running statistics (``running_mean``/``running_var``) always travel cast to
  ``transport.dtype``, outside the codec chain and error feedback;
- ``excluded``: tensors matching a ``transport.exclude`` glob (``*.bias``, ``fc.*``, ...) travel the same way;
- ``codec``: every other tensor goes through the codec chain (dense in ``dtype`` during the first
  ``dense_warmup_rounds`` rounds), with error feedback when ``transport.error_feedback`` is on.

:func:`encode_update` returns the encoded tensors and the byte count of each group; :func:`decode_update`
rebuilds fp32 tensors from untrusted parts, raising only ``ValueError`` naming the tensor at fault.
Every payload carries a header (format version + codec-chain descriptor + dtype) that
:func:`check_header` compares with the receiver's own config before anything is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch

from models.state import BN_STAT_NAMES
from pipeline.config import TransportConfig
from pipeline.transport.codecs import Cast, Chain, CodecContext, Encoded, parse_chain
from pipeline.transport.error_feedback import ErrorFeedback

FORMAT_VERSION = 2  # 2: an encoded update is one packed buffer (wire.update_to_record)
GROUPS = ("codec", "excluded", "bn")


def tensor_group(name: str, transport: TransportConfig) -> str:
    """``bn``, ``excluded`` or ``codec`` (see the module docstring)."""
    if name.rsplit(".", 1)[-1] in BN_STAT_NAMES:
        return "bn"
    if any(fnmatchcase(name, pattern) for pattern in transport.exclude):
        return "excluded"
    return "codec"


def dense_chain(dtype: str) -> Chain:
    """What a dense tensor travels as: fp32 values, or a bf16/fp16 cast."""
    return Chain([]) if dtype == "fp32" else Chain([Cast(dtype)])


def round_chain(transport: TransportConfig, round: int) -> Chain:
    """The chain of the ``codec`` group in ``round`` (1-based): dense during the warm-up rounds."""
    if round <= transport.dense_warmup_rounds or not transport.codec:
        return dense_chain(transport.dtype)
    return parse_chain(transport.codec)


def tensor_chain(name: str, transport: TransportConfig, round: int) -> Chain:
    return round_chain(transport, round) if tensor_group(name, transport) == "codec" else dense_chain(transport.dtype)


def downlink_rules(transport: TransportConfig) -> TransportConfig:
    """The rules of a ``delta`` downlink (the server's compressed change of the global model): the same
    per-tensor rules, dtype and warm-up, with ``downlink.codec`` and ``downlink.error_feedback``."""
    if transport.downlink.kind != "delta":
        raise ValueError("transport.downlink.kind is 'full': the global model travels dense in transport.dtype")
    return transport.model_copy(update={"codec": list(transport.downlink.codec),
                                        "error_feedback": transport.downlink.error_feedback})


def header(transport: TransportConfig, round: int) -> dict[str, Any]:
    """What the receiver checks before decoding: format version, chain descriptor, dense dtype."""
    return {"format": FORMAT_VERSION, "codec": round_chain(transport, round).descriptor(), "dtype": transport.dtype}


def check_header(received: Any, transport: TransportConfig, round: int) -> None:
    """Refuse a payload whose header does not match this side's config for ``round`` (ValueError, one line)."""
    want = header(transport, round)
    if not isinstance(received, dict):
        raise ValueError("transport header: expected a mapping")
    if received.get("format") != FORMAT_VERSION:
        raise ValueError(f"transport header: format {received.get('format')!r}, this side reads {FORMAT_VERSION}")
    for key in ("codec", "dtype"):
        if received.get(key) != want[key]:
            raise ValueError(f"transport header: {key} {received.get(key)!r} does not match this run's {want[key]!r}")


@dataclass
class EncodedUpdate:
    """Encoded tensors (state order), the group of each, and the header that travels with them."""

    tensors: dict[str, Encoded]
    groups: dict[str, str]
    header: dict[str, Any]

    def nbytes_by_group(self) -> dict[str, int]:
        out = dict.fromkeys(GROUPS, 0)
        for name, enc in self.tensors.items():
            out[self.groups[name]] += enc.nbytes
        return out

    @property
    def nbytes(self) -> int:
        return sum(enc.nbytes for enc in self.tensors.values())


def encode_update(update: dict[str, torch.Tensor], transport: TransportConfig, ctx: CodecContext,
                  error_feedback: ErrorFeedback | None = None) -> EncodedUpdate:
    """Encode ``update`` for round ``ctx.round`` under ``transport``'s rules.

    ``error_feedback`` is the node's residual store: required when ``transport.error_feedback`` is on (it
    is read and updated for ``codec`` tensors only), refused otherwise.
    """
    if transport.error_feedback != (error_feedback is not None):
        raise ValueError("transport.error_feedback is " + ("on: pass the node's ErrorFeedback store"
                                                           if transport.error_feedback else "off: got a store"))
    tensors: dict[str, Encoded] = {}
    groups: dict[str, str] = {}
    for name, tensor in update.items():
        if not tensor.is_floating_point():
            raise ValueError(f"update tensor {name!r}: codecs encode float tensors, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"update tensor {name!r} has non-finite values")
        group = tensor_group(name, transport)
        chain = tensor_chain(name, transport, ctx.round)
        named = ctx.named(name)
        if group == "codec" and error_feedback is not None:
            compensated = error_feedback.compensate(name, tensor, ctx.round)
            enc = chain.encode(compensated, named)
            error_feedback.record(name, compensated, chain.decode(enc), ctx.round)
        else:
            enc = chain.encode(tensor, named)
        tensors[name], groups[name] = enc, group
    return EncodedUpdate(tensors, groups, header(transport, ctx.round))


def decode_update(parts: dict[str, dict[str, torch.Tensor]], transport: TransportConfig,
                  layout: dict[str, tuple[int, ...]], round: int) -> dict[str, torch.Tensor]:
    """fp32 tensors of ``layout`` (name -> shape, the receiver's own model) from untrusted ``parts``.

    Every tensor of ``layout`` must be present and no other; a malformed or non-finite one raises a
    ValueError naming it.
    """
    extra = sorted(set(parts) - set(layout))
    if extra:
        raise ValueError(f"update tensor {extra[0]!r} is not part of this model")
    out: dict[str, torch.Tensor] = {}
    for name, shape in layout.items():
        if name not in parts:
            raise ValueError(f"update tensor {name!r} is missing")
        chain = tensor_chain(name, transport, round)
        try:
            tensor = chain.decode(Encoded(chain.descriptor(), tuple(shape), dict(parts[name])))
        except (ValueError, RuntimeError, IndexError, TypeError, OverflowError) as exc:
            raise ValueError(f"update tensor {name!r} ({chain.descriptor()}): {exc}") from None
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"update tensor {name!r} decodes to non-finite values")
        out[name] = tensor
    return out


def decode_encoded(update: EncodedUpdate, transport: TransportConfig, round: int) -> dict[str, torch.Tensor]:
    """Decode an in-process :class:`EncodedUpdate` (header checked, as on the wire)."""
    check_header(update.header, transport, round)
    layout = {name: enc.shape for name, enc in update.tensors.items()}
    return decode_update({n: e.parts for n, e in update.tensors.items()}, transport, layout, round)
