"""Test-only fault injection, kept out of the production code and config schema.

- :func:`faulty_client_app`: a ClientApp that calls the real ``clients.app.app`` and then corrupts the reply
  of chosen partitions (``raise`` before training, ``nan`` values, a ``shape`` one row too long).
- :func:`dying_train_func`: wraps the Ray worker function so that one rank kills its process once, right
  after the checkpoint of the epoch before ``epoch`` is committed (a marker file in the run's Ray storage
  makes it happen once), so the restarted attempt deterministically resumes from that checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

FAULTS = ("raise", "nan", "shape")
FAULT_MARKER = "fault_injected_epoch_{epoch}"


def corrupt_state(state: dict[str, torch.Tensor], fault: str) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose first tensor is all NaN (``nan``) or one row too long (``shape``)."""
    state = dict(state)
    key = next(iter(state))
    if fault == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif fault == "shape":
        state[key] = torch.zeros((state[key].shape[0] + 1, *state[key].shape[1:]), dtype=state[key].dtype)
    else:
        raise ValueError(f"unknown fault {fault!r} (expected one of {FAULTS})")
    return state


def faulty_client_app(faults: dict[int, str], rounds: set[int] | None = None) -> ClientApp:
    """``clients.app.app`` whose train replies from partition ids in ``faults`` are broken as named there
    (in every round, or only in ``rounds``)."""
    from clients.app import app as honest
    from pipeline.transport.wire import decode_record, encode_state

    bad = {int(k): v for k, v in faults.items() if v not in FAULTS}
    if bad:
        raise ValueError(f"unknown faults {bad} (expected {FAULTS})")
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fault = faults.get(int(context.node_config["partition-id"]))
        if rounds is not None and int(msg.content["config"]["server-round"]) not in rounds:
            fault = None
        if fault == "raise":
            raise RuntimeError(f"injected fault: partition {context.node_config['partition-id']} raises")
        reply = honest(msg, context)
        if fault is not None:
            arrays = reply.content["arrays"]
            dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[next(iter(arrays.values())).dtype]
            reply.content["arrays"] = encode_state(corrupt_state(decode_record(arrays), fault), dtype)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def recording_client_app(seen: list[dict[str, Any]]) -> ClientApp:
    """``clients.app.app`` that appends each train message's round, partition and config to ``seen``."""
    from clients.app import app as honest

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        seen.append({"round": int(config["server-round"]), "partition": int(context.node_config["partition-id"]),
                     **{k: config[k] for k in config}})
        return honest(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


# ------------------------------------------------------------------------------------------------ Ray
def fault_rank(world_size: int) -> int:
    """The rank that dies (rank 1; rank 0 when training alone)."""
    return min(1, world_size - 1)


def wait_for_committed_checkpoint(run_storage: Path, dir_name: str, timeout: float = 60.0) -> bool:
    """Poll Ray Train's checkpoint-manager snapshot until its latest checkpoint is ``dir_name``."""
    snapshot = Path(run_storage) / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if latest.get("checkpoint_dir_name") == dir_name:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return False


def _die_once_after_report(config: dict[str, Any], *, epoch: int) -> None:
    import ray.train

    from clients.ray_worker import CHECKPOINT_DIR, train_func

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    storage = Path(ctx.get_storage().experiment_fs_path)
    marker = storage / FAULT_MARKER.format(epoch=epoch)
    real_report = ray.train.report

    def report(metrics: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        real_report(metrics, *args, **kwargs)
        if rank != fault_rank(world) or metrics.get("epoch") != epoch - 1 or marker.exists():
            return
        wait_for_committed_checkpoint(storage, CHECKPOINT_DIR.format(epoch=epoch - 1))
        marker.write_text(f"rank {rank} killed itself before epoch {epoch}\n")
        print(f"[test] fault injection: rank {rank} exits before epoch {epoch}", flush=True)
        os._exit(1)

    ray.train.report = report  # the worker calls ray.train.report through the module attribute
    try:
        train_func(config)
    finally:
        ray.train.report = real_report


def dying_train_func(epoch: int):
    """A Ray worker function: :func:`clients.ray_worker.train_func`, but rank 1 dies once before ``epoch``."""
    if epoch < 2:
        raise ValueError("dying_train_func: epoch must be >= 2 (a checkpoint must exist to resume from)")
    return functools.partial(_die_once_after_report, epoch=epoch)
