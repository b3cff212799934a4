"""A node's error-feedback residuals on its own disk, one safetensors file per round it took part in.

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

from pipeline.transport.error_feedback import ErrorFeedback

_FILE = re.compile(r"ef-round-(\d+)\.safetensors")
KEEP = 2


def node_state_dir(root: Path, partition_id: int) -> Path:
    """The folder of partition ``partition_id``'s state under a run dir (simulation)."""
    return Path(root) / "nodes" / f"node-{int(partition_id)}"


def _rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _FILE.fullmatch(p.name)))


def load_residuals(folder: Path, server_round: int, decay: float) -> ErrorFeedback:
    """The residuals as they stood before ``server_round`` (empty for a new node)."""
    feedback = ErrorFeedback(decay)
    earlier = [r for r in _rounds(folder) if r < server_round]
    if earlier:
        path = folder / f"ef-round-{earlier[-1]}.safetensors"
        try:
            feedback.load_state_dict(safetensors.torch.load_file(str(path)))
        except (OSError, ValueError, safetensors.SafetensorError) as exc:
            raise ValueError(f"error feedback store {str(path)!r}: {exc}") from None
    return feedback


def save_residuals(folder: Path, server_round: int, feedback: ErrorFeedback) -> Path:
    """Write round ``server_round``'s residuals atomically and prune all but the ``KEEP`` newest files."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ef-round-{int(server_round)}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(feedback.state_dict(), str(tmp))
    os.replace(tmp, path)
    for old in _rounds(folder)[:-KEEP]:
        (folder / f"ef-round-{old}.safetensors").unlink(missing_ok=True)
    return path
