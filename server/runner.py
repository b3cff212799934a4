"""The ServerApp's body: federated rounds with centralised evaluation, checkpoints, resume and final outputs.

``run_server(grid, cfg, run_dir)`` is shared by ``flwr run .`` (``server.app``) and the pipeline's flower
engine (``pipeline.engines.flower``), so both produce the same run dir for the same config and seed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from torch import nn

import models
from pipeline.checkpoint import (
    ServerCheckpoint,
    capture_rng,
    latest_round_checkpoint,
    restore_rng,
    save_round_checkpoint,
)
from pipeline.config import RunConfig, communicate_mode
from pipeline.modeling import build_training_model
from pipeline.tracking import track_history
from pipeline.train import evaluate, lr_at, resolve_device, seed_everything
from pipeline.transport.compact_space import LIFT_RESIDUAL_KEY, CompactSpace, compact_space
from pipeline.transport.node_store import check_run_key, claim_node_stores, legacy_run_key, new_run_key
from pipeline.transport.update import header
from pipeline.transport.wire import (
    CONFIG_HASH_KEY,
    CONFIG_KEY,
    HEADER_KEY,
    LRS_KEY,
    RUN_KEY,
    config_hash,
    config_to_json,
    decode_record,
    encode_state,
    record_nbytes,
    to_numpy_record,
)
from server.loop import run_rounds
from server.strategies import build_strategy

log = logging.getLogger("compactfl.server")
CHECKPOINT_DIR = "checkpoints"  # <run dir>/checkpoints/round-NNNN.safetensors


class CentralEvaluator:
    """Evaluates the finalised (contracted / materialised) global model on the test set each round."""

    def __init__(self, cfg: RunConfig, model: nn.Module) -> None:
        from pipeline.data import test_loader

        self.model = model
        self.space = compact_space(cfg)
        self.device = resolve_device(cfg.device)
        self.loader = test_loader(cfg)

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Test loss/accuracy of the compact model a user would deploy after this round."""
        return evaluate(models.finalize(global_model(self.model, self.space, state)).to(self.device), self.loader,
                        self.device)


def global_model(model: nn.Module, space: CompactSpace | None, state: dict[str, torch.Tensor]) -> nn.Module:
    """The training-time model holding the global ``state``: ``model`` loaded in place, or with ExpandNet layers
    travelling compact a fresh materialisation (the seeded expansion with ``state`` lifted into it), so the
    result depends on ``state`` alone (a resumed run evaluates and deploys the same model)."""
    if space is not None:
        return space.materialize(state)
    models.load_trainable_state(model, state)
    return model


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    return float(metrics[key]) if metrics is not None and key in metrics else None


def round_lrs(cfg: RunConfig, server_round: int) -> list[float]:
    """The learning rates of one round's local epochs: the run's schedule on the global epoch count
    ``(round - 1) * local_epochs + local epoch``, over a horizon of ``rounds * local_epochs`` epochs."""
    epochs = cfg.engine.local_epochs
    horizon = cfg.engine.rounds * epochs
    return [lr_at(cfg.train, (server_round - 1) * epochs + e, horizon) for e in range(epochs)]


def log_partitions(cfg: RunConfig) -> None:
    """Log each simulated client's class counts (run.log), so a skewed split is visible next to the results."""
    from pipeline.data import DataError, partition_table

    try:
        table = partition_table(cfg, cfg.engine.clients)
    except DataError as exc:  # a deployed server may hold no training split: the nodes hold their own
        log.info("training partitions: not shown (%s)", exc)
        return
    log.info("training partitions (%s, %d clients):\n%s", cfg.data.partition.kind, cfg.engine.clients, table)


def upload_compression(history: list[dict[str, Any]], dense_fp32_bytes: int) -> dict[str, Any]:
    """Mean upload per client per round over the run, and how many times smaller it is than dense fp32."""
    ups = [r["bytes_up_per_client"] for r in history if r.get("bytes_up_per_client")]
    mean_up = sum(ups) / len(ups) if ups else 0.0
    return {"upload_bytes_per_client_round": round(mean_up, 1), "dense_fp32_bytes_per_client": int(dense_fp32_bytes),
            "upload_compression": round(dense_fp32_bytes / mean_up, 2) if mean_up else None,
            "message_bytes_total": int(sum(r.get("message_bytes_up", 0) + r.get("message_bytes_down", 0)
                                           for r in history)),
            **{f"{key}_round": round(sum(r.get(key, 0) for r in history) / len(history), 1)
               for key in sorted({k for r in history for k in r if k.startswith("bytes_up_")} - {"bytes_up_per_client"})
               if history}}


def run_server(grid: Grid, cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg.engine.rounds`` federated rounds (resuming when asked) and finish the run; returns summary."""
    from pipeline.stages import finish_run
    from pipeline.teacher import get_teacher

    if cfg.engine.kind != "flower":
        raise ValueError(f"engine.kind must be 'flower' for the Flower ServerApp, got {cfg.engine.kind!r}")
    started = time.perf_counter()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    # Train (or reuse) a teacher spec once, before any client asks for it: clients then load the saved copy
    # instead of each training its own at the same time.
    get_teacher(cfg, "cpu")
    seed_everything(cfg.seed)
    model = build_training_model(cfg)
    space = compact_space(cfg)  # ExpandNet layers travel compact: the global state is in its wire layout
    initial = space.wire_state(model) if space is not None else models.trainable_state(model)
    state = {k: v.detach().cpu().clone().float() for k, v in initial.items()}
    strategy = build_strategy(cfg)
    history: list[dict[str, Any]] = []
    first_round = 1
    nodes = len(list(grid.get_node_ids()))
    if nodes != cfg.engine.clients:
        log.info("the federation has %d nodes now, engine.clients=%d: partitions follow each node's "
                 "num-partitions", nodes, cfg.engine.clients)
        strategy.set_num_partitions(nodes)
    evaluator = CentralEvaluator(cfg, model)
    log_partitions(cfg)
    run_key, legacy = new_run_key(), False  # a fresh run: nodes keep its state apart from any earlier run's
    if cfg.resume:
        ckpt = latest_round_checkpoint(ckpt_dir, cfg)
        if ckpt is None:
            log.warning("resume: no checkpoint in %s, starting from round 1", ckpt_dir)
        else:
            state, history, first_round = ckpt.global_state, ckpt.history, ckpt.round + 1
            strategy.load_state_arrays(ckpt.strategy_state)
            restore_rng(ckpt.rng)
            legacy = ckpt.run_key is None  # written before run keys: a stable key from the run name
            run_key = check_run_key(ckpt.run_key or legacy_run_key(cfg.name), f"checkpoint {ckpt_dir} run_key")
            log.info("resume: continuing after round %d from %s", ckpt.round, ckpt_dir)
    for stale in claim_node_stores(run_dir, run_key, adopt_flat_files=legacy):
        log.info("removed node state of another run: %s", stale)
    cfg_json = config_to_json(cfg)
    cfg_hash = config_hash(cfg_json)

    def round_config(rnd: int) -> ConfigRecord:
        """What every train/evaluate message of round ``rnd`` carries: the run config (its JSON only in the first
        message to each node, the strategy strips it from later ones), the round's LRs, the transport header
        (format version, codec chain, dtype) that nodes check against their config, and the run key that names
        the nodes' state folders."""
        return ConfigRecord({CONFIG_KEY: cfg_json, CONFIG_HASH_KEY: cfg_hash, LRS_KEY: round_lrs(cfg, rnd),
                             HEADER_KEY: json.dumps(header(cfg.transport, rnd), sort_keys=True), RUN_KEY: run_key})

    def on_round(rnd: int, arrays: ArrayRecord, train_m: MetricRecord | None, eval_m: MetricRecord | None,
                 seconds: float) -> None:
        global_state = decode_record(arrays)
        record: dict[str, Any] = {"round": rnd, "train_loss": _metric(train_m, "train-loss"),
                                  "train_accuracy": _metric(train_m, "train-accuracy")}
        if space is not None:  # the replies' largest lift residual, averaged (weighted) over the round's nodes
            record["lift_residual"] = _metric(train_m, LIFT_RESIDUAL_KEY)
        record.update(evaluator(global_state))
        if eval_m is not None:
            record["federated_test_accuracy"] = _metric(eval_m, "test-accuracy")
        record.update(strategy.round_report.get(rnd, {}))
        record.update(strategy.ledger.summary(rnd))
        record["seconds"] = seconds
        history.append(record)
        log.info("round %d: test accuracy %.4f, bytes up %d (%d per client) down %d, replies ok %d failed %d "
                 "dropped %d clipped %d", rnd, record["test_accuracy"], record["bytes_up"],
                 record["bytes_up_per_client"], record["bytes_down"],
                 record["replies_ok"], record["replies_failed"], record["replies_dropped"], record["replies_clipped"])
        save_round_checkpoint(ckpt_dir, ServerCheckpoint(rnd, global_state, strategy.state_arrays(), history,
                                                   capture_rng(), run_key=run_key), cfg)
        track_history(cfg, run_dir, history)

    final = to_numpy_record(state)
    if first_round <= cfg.engine.rounds:
        final = run_rounds(strategy, grid, final, first_round=first_round, last_round=cfg.engine.rounds,
                           timeout=cfg.engine.round_timeout, config=round_config, on_round=on_round)
    model = global_model(model, space, decode_record(final))
    extra = {"rounds": len(history), "clients": cfg.engine.clients,
             "strategy": cfg.engine.strategy, "transport_dtype": cfg.transport.dtype,
             "transport_codec": "+".join(cfg.transport.codec) or "none",
             "transport_communicate": communicate_mode(cfg) or "n/a",
             **({"transport_factor_layers": ",".join(space.layout.fallback) or "none"} if space is not None else {}),
             "transport_downlink": (cfg.transport.downlink.kind if cfg.transport.downlink.kind == "full" else
                                    f"delta({'+'.join(cfg.transport.downlink.codec) or cfg.transport.dtype})"),
             "payload_bytes_up_per_client": history[-1]["bytes_up_per_client"] if history else 0,
             **upload_compression(history, record_nbytes(encode_state(decode_record(final), "fp32"))),
             "bytes_per_round": [int(r["bytes_up"] + r["bytes_down"]) for r in history],
             "flower_seconds": time.perf_counter() - started}
    return finish_run(cfg, model, history, run_dir, extra=extra)
