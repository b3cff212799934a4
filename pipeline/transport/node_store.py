"""A node's own state on its own disk (error-feedback residuals, the global model a delta downlink builds on, an
ExpandNet node's own factors under ``transport.communicate: compact``),
one safetensors file per kind and round it took part in.

Flower's ``Context.state`` lives for one Flower run and a resumed run is a new one, so the residuals live in
a folder keyed by partition id: ``<run dir>/nodes/node-<pid>/`` in simulation, the node's ``state-dir`` (or
its ``data-dir``) node-config key in deployment (never a path from the server's message).

Resume stays bit-identical without the server checkpoint holding the residuals: round ``r`` reads the newest
file of a round ``< r`` and writes ``ef-round-<r>.safetensors`` atomically, keeping the two newest files.
A run killed after a node wrote round ``r`` but before the server checkpointed it reruns round ``r`` from
the same file as the first attempt (the round-``r`` file is overwritten). A node that skips rounds keeps its
file; :class:`~pipeline.transport.error_feedback.ErrorFeedback` ages it by ``residual_decay ** skipped``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import safetensors.torch
import torch

from pipeline.transport.error_feedback import ErrorFeedback

KEEP = 2
RESIDUALS, GLOBAL, FACTORS = "ef", "global", "factors"  # FACTORS: an ExpandNet node's own factors (compact mode)


def node_state_dir(root: Path, partition_id: int) -> Path:
    """The folder of partition ``partition_id``'s state under a run dir (simulation)."""
    return Path(root) / "nodes" / f"node-{int(partition_id)}"


def _rounds(folder: Path, kind: str) -> list[int]:
    pattern = re.compile(rf"{kind}-round-(\d+)\.safetensors")
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name)))


def load_latest(folder: Path, kind: str, before_round: int) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(round, tensors) of the newest ``kind`` file of a round ``< before_round``; None when there is none."""
    earlier = [r for r in _rounds(folder, kind) if r < before_round]
    if not earlier:
        return None
    path = folder / f"{kind}-round-{earlier[-1]}.safetensors"
    try:
        return earlier[-1], safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as exc:
        raise ValueError(f"node state {str(path)!r}: {exc}") from None


def save_round(folder: Path, kind: str, server_round: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write round ``server_round``'s ``kind`` file atomically and prune all but the ``KEEP`` newest files."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-round-{int(server_round)}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    for old in _rounds(folder, kind)[:-KEEP]:
        (folder / f"{kind}-round-{old}.safetensors").unlink(missing_ok=True)
    return path


def load_residuals(folder: Path, server_round: int, decay: float) -> ErrorFeedback:
    """The residuals as they stood before ``server_round`` (empty for a new node)."""
    feedback = ErrorFeedback(decay)
    found = load_latest(folder, RESIDUALS, server_round)
    if found is not None:
        try:
            feedback.load_state_dict(found[1])
        except ValueError as exc:
            raise ValueError(f"error feedback store in {str(folder)!r}: {exc}") from None
    return feedback


def save_residuals(folder: Path, server_round: int, feedback: ErrorFeedback) -> Path:
    """Write round ``server_round``'s residuals (see :func:`save_round`)."""
    return save_round(folder, RESIDUALS, server_round, feedback.state_dict())
