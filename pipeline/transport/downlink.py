"""The ``delta`` downlink, shared by server and nodes: the compressed change of the global model.

The server keeps a *shadow* ``S``: the model every in-sync node holds. In round ``r`` it encodes
``master - S_{r-1}`` with ``transport.downlink.codec`` and both sides compute ``S_r = S_{r-1} +
decode(delta)`` with :func:`apply_delta` (the same fp32 operations, so node and server agree bit for bit).
What the codec dropped stays in ``master - S_r`` and is sent in later rounds (server-side error feedback).
A node that held ``S_{r-1}`` gets the delta; any other (new, restarted, skipped a round) gets ``S_r`` itself
in fp32 (``full``). Each train message names its kind and base round (``downlink``, ``base-round``) and each
reply the round of the model it trained from (``base-round``). Nodes train from ``S_r``; the server adds
their updates to its fp32 master, which it evaluates and deploys.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from pipeline.config import TransportConfig
from pipeline.transport.codecs import CodecContext
from pipeline.transport.update import downlink_rules, encode_update
from pipeline.transport.wire import record_to_update, update_to_record

KIND_KEY, BASE_KEY = "downlink", "base-round"
FULL, DELTA = "full", "delta"
#: the start of a node's error reason when it does not hold the base a delta names (it gets the full model next)
BASE_MISMATCH = "downlink base mismatch"
#: partition slot of the server in codec contexts (its stochastic rounding never collides with a node's)
SERVER_PARTITION = -1


def delta_rules(transport: TransportConfig) -> TransportConfig:
    """The per-tensor rules of the delta (its error feedback is the shadow, not a residual store)."""
    return downlink_rules(transport).model_copy(update={"error_feedback": False})


def encode_delta(change: dict[str, torch.Tensor], transport: TransportConfig, seed: int,
                 server_round: int) -> ArrayRecord:
    """``master - S_{r-1}`` through the downlink chain, as the record a node receives."""
    ctx = CodecContext(seed, server_round, SERVER_PARTITION)
    return update_to_record(encode_update(change, delta_rules(transport), ctx))


def apply_delta(base: dict[str, torch.Tensor], record: ArrayRecord, transport: TransportConfig,
                server_round: int) -> dict[str, torch.Tensor]:
    """``S_r = S_{r-1} + decode(delta)`` (fp32); an undecodable delta is a ValueError naming the tensor."""
    layout = {k: tuple(v.shape) for k, v in base.items()}
    delta = record_to_update(record, delta_rules(transport), layout, server_round)
    return {k: base[k].float() + delta[k] for k in layout}
