"""The two seams between a node's model and the wire: what it applies on receipt, and what it sends back.

:func:`received_state` turns a train message's arrays into the state the node trains from (the full global
model, or with the ``delta`` downlink the model it holds plus the received change); :func:`node_receiver` says
how it enters the node's model. :func:`outgoing_arrays` turns the trained
state into the ArrayRecord that travels: without a ``transport.codec`` chain the trainable state cast to
``transport.dtype``; with one, the **update** ``trained - base`` through the chain (``encode_update``), with
the node's error-feedback residuals read from and written to its own store
(:mod:`pipeline.transport.node_store`) and stochastic rounding seeded by (seed, round, partition).

ExpandNets under ``transport.communicate: compact`` (:mod:`pipeline.transport.compact_space`): the global
state is in the run's wire layout; :func:`node_receiver` lifts it into the factors the node lifted the
previous global model into (kept in its store between rounds; the seeded initial expansion for a node without
any), and :func:`outgoing_arrays` contracts the trained factors back to the wire layout before the update
``trained - base`` goes through the codec chain like any dense update.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

import models
from pipeline.config import RunConfig
from pipeline.transport.codecs import CodecContext
from pipeline.transport.compact_space import LIFT_RESIDUAL_KEY, compact_space
from pipeline.transport.downlink import BASE_KEY, BASE_MISMATCH, DELTA, FULL, KIND_KEY, apply_delta
from pipeline.transport.node_store import (
    FACTORS,
    GLOBAL,
    load_latest,
    load_residuals,
    save_residuals,
    save_round,
)
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


def received_state(cfg: RunConfig, config: ConfigRecord, arrays: ArrayRecord, *, server_round: int,
                   state_folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 state this node trains from (the base its update is measured against).

    With the ``delta`` downlink: the full model, or the model this node holds plus the received change (a node
    that does not hold the base the message names refuses with the reason); the result is stored as this
    round's model in the node's own folder.
    """
    if cfg.transport.downlink.kind != "delta":
        return decode_record(arrays)
    kind = config.get(KIND_KEY)
    if kind == DELTA:
        base_round = int(config[BASE_KEY])
        held = load_latest(state_folder, GLOBAL, server_round)
        if held is None or held[0] != base_round:
            raise ValueError(f"{BASE_MISMATCH}: the delta builds on round {base_round}, this node holds "
                             f"{'no model' if held is None else f'round {held[0]}'}")
        state = apply_delta(held[1], arrays, cfg.transport, server_round)
    elif kind == FULL:
        state = decode_record(arrays)
    else:
        raise ValueError(f"train message config: {KIND_KEY} must be {FULL!r} or {DELTA!r}, got {kind!r}")
    save_round(state_folder, GLOBAL, server_round, state)
    return state


def node_receiver(cfg: RunConfig, *, server_round: int, state_folder: Path
                  ) -> Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, float]] | None:
    """How a received state enters the freshly built training model: None (load it as it is) unless ExpandNet
    layers travel compact; then the factors this node lifted the previous global model into are loaded (none:
    the model keeps the seeded initial expansion), the received wire state is lifted into them, and the result
    is stored for the next round; the callable returns the largest lift residual as a reply metric.

    Lifting into the previous GLOBAL factors (not into the factors this node trained) makes the lift the same
    computation on every node: nodes that took part in the previous round start from identical factors, as
    they would if factors travelled, without sending them (a node that missed rounds lifts from older factors:
    the same compact function, another factorisation)."""
    space = compact_space(cfg)
    if space is None:
        return None

    def receive(model: nn.Module, wire: dict[str, torch.Tensor]) -> dict[str, float]:
        held = load_latest(state_folder, FACTORS, server_round)
        if held is not None:
            try:
                models.load_trainable_state(model, held[1])
            except ValueError as exc:
                raise ValueError(f"node factor store in {str(state_folder)!r}: {exc}") from None
        residual = space.compact_residual(space.receive(model, wire))
        save_round(state_folder, FACTORS, server_round, models.trainable_state(model))
        return {LIFT_RESIDUAL_KEY: residual}

    return receive


def outgoing_arrays(cfg: RunConfig, base: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], *,
                    partition_id: int, server_round: int, state_folder: Path) -> tuple[ArrayRecord, dict[str, int]]:
    """The reply's ArrayRecord and its payload bytes per tensor group (``codec``/``excluded``/``bn``)."""
    t = cfg.transport
    space = compact_space(cfg)
    if space is not None:  # what travels is the trained factors' wire-layout contraction
        trained = space.wire_state(space.holding(trained))
    if not t.codec:
        return encode_state(trained, t.dtype), {}
    update = {k: trained[k].detach().cpu().float() - base[k].float() for k in trained}
    feedback = load_residuals(state_folder, server_round, t.residual_decay) if t.error_feedback else None
    encoded = encode_update(update, t, CodecContext(cfg.seed, server_round, partition_id), feedback)
    if feedback is not None:
        save_residuals(state_folder, server_round, feedback)
    return update_to_record(encoded), encoded.nbytes_by_group()
