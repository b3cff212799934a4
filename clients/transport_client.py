"""The two seams between a node's model and the wire: what it applies on receipt, and what it sends back.

:func:`received_state` turns a train message's arrays into the state the node trains from (today the full
global model; a delta downlink or ExpandNet lifting plugs in here). :func:`outgoing_arrays` turns the trained
state into the ArrayRecord that travels: without a ``transport.codec`` chain the trainable state cast to
``transport.dtype``; with one, the **update** ``trained - base`` through the chain (``encode_update``), with
the node's error-feedback residuals read from and written to its own store
(:mod:`pipeline.transport.node_store`) and stochastic rounding seeded by (seed, round, partition).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord

from pipeline.config import RunConfig
from pipeline.transport.codecs import CodecContext
from pipeline.transport.node_store import load_residuals, save_residuals
from pipeline.transport.update import check_header, encode_update
from pipeline.transport.wire import HEADER_KEY, decode_record, encode_state, update_to_record


def check_message_header(config: ConfigRecord, cfg: RunConfig, server_round: int) -> None:
    """Refuse a train message whose transport header (format version, chain, dtype) is not this run's."""
    if HEADER_KEY not in config:
        raise ValueError(f"train message lacks its {HEADER_KEY!r} (was it sent by the compactfl ServerApp?)")
    try:
        check_header(json.loads(str(config[HEADER_KEY])), cfg.transport, server_round)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"node refuses the server's message: {exc}") from None


def received_state(cfg: RunConfig, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The fp32 state this node trains from (the base its update is measured against)."""
    return decode_record(arrays)


def outgoing_arrays(cfg: RunConfig, base: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], *,
                    partition_id: int, server_round: int, state_folder: Path) -> tuple[ArrayRecord, dict[str, int]]:
    """The reply's ArrayRecord and its payload bytes per tensor group (``codec``/``excluded``/``bn``)."""
    t = cfg.transport
    if not t.codec:
        return encode_state(trained, t.dtype), {}
    update = {k: trained[k].detach().cpu().float() - base[k].float() for k in trained}
    feedback = load_residuals(state_folder, server_round, t.residual_decay) if t.error_feedback else None
    encoded = encode_update(update, t, CodecContext(cfg.seed, server_round, partition_id), feedback)
    if feedback is not None:
        save_residuals(state_folder, server_round, feedback)
    return update_to_record(encoded), encoded.nbytes_by_group()
