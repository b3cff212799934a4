"""A node's own state on its own disk (error-feedback residuals, the global model a delta downlink builds on, an
ExpandNet node's own factors under ``transport.communicate: compact``),
one safetensors file per kind and round it took part in.

Flower's ``Context.state`` lives for one Flower run and a resumed run is a new one, so the state lives in a
folder per partition: ``<run dir>/nodes/node-<pid>/`` in simulation, the node's ``state-dir`` (or its
``data-dir``) node-config key in deployment (never a path from the server's message). Inside it, each run has
its own folder ``run-<key>/``: the server draws a random run key (:func:`new_run_key`) at a fresh start, keeps
it in its round checkpoint (a resume continues the same key) and sends it in every message; a node checks it
(:func:`check_run_key`: 32 lowercase hex characters, so no server string ever becomes a path) before building
the folder. A fresh run into a run dir or onto a node that holds an earlier run's state thus never reads it.
A checkpoint written before run keys existed resumes under :func:`legacy_run_key` (its run name); the
simulation server moves that run's flat files into its folder (:func:`claim_node_stores`).
Cleanup: in simulation the run dir is the server's, so at start it removes the other runs' folders (and flat
files from before run keys) under ``<run dir>/nodes/``; a deployed node never deletes other runs' folders
(its operator may: each holds at most two files per kind).

Resume stays bit-identical without the server checkpoint holding the residuals: round ``r`` reads the newest
file of a round ``< r`` and writes ``ef-round-<r>.safetensors`` atomically, first removing files of rounds
``> r`` (an abandoned future) and then keeping the two newest files.
A run killed after a node wrote round ``r`` but before the server checkpointed it reruns round ``r`` from
the same file as the first attempt (the round-``r`` file is overwritten). A node that skips rounds keeps its
file; :class:`~pipeline.transport.error_feedback.ErrorFeedback` ages it by ``residual_decay ** skipped``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

import safetensors.torch
import torch

from pipeline.transport.error_feedback import ErrorFeedback

KEEP = 2
RESIDUALS, GLOBAL, FACTORS = "ef", "global", "factors"  # FACTORS: an ExpandNet node's own factors (compact mode)
NODES = "nodes"  # <run dir>/nodes/node-<pid>/run-<key>/
RUN_KEY_LENGTH = 32
_RUN_KEY = re.compile(rf"[0-9a-f]{{{RUN_KEY_LENGTH}}}")
_RUN_FOLDER = re.compile(rf"run-[0-9a-f]{{{RUN_KEY_LENGTH}}}")
_STATE_FILE = re.compile(rf"({RESIDUALS}|{GLOBAL}|{FACTORS})-round-\d+\.safetensors(\.tmp)?")


def node_state_dir(root: Path, partition_id: int) -> Path:
    """The folder of partition ``partition_id``'s state under a run dir (simulation), holding one per run."""
    return Path(root) / NODES / f"node-{int(partition_id)}"


def new_run_key() -> str:
    """A fresh run's key (random: two runs never share one; draws from the OS, not the seeded RNGs)."""
    return uuid.uuid4().hex


def legacy_run_key(name: str) -> str:
    """The stable key of a run whose checkpoint predates run keys, derived from its run name."""
    return hashlib.sha256(f"compactfl-run:{name}".encode()).hexdigest()[:RUN_KEY_LENGTH]


def check_run_key(value: object, what: str = "run key") -> str:
    """``value`` when it is a run key (exactly 32 lowercase hex characters), else a one-line ValueError."""
    if not isinstance(value, str) or not _RUN_KEY.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ValueError(f"{what} must be {RUN_KEY_LENGTH} lowercase hex characters, got {shown}")
    return value


def run_state_dir(node_folder: Path, run_key: str) -> Path:
    """The folder of one run's state inside a node's folder (the key is checked first)."""
    return Path(node_folder) / f"run-{check_run_key(run_key)}"


def claim_node_stores(run_dir: Path, run_key: str, adopt_flat_files: bool = False) -> list[Path]:
    """Simulation server, at start: remove every other run's folder (and flat files from before run keys)
    under ``<run dir>/nodes/``; with ``adopt_flat_files`` (resuming a checkpoint from before run keys) move the
    flat files into this run's folder instead. Returns what was removed."""
    removed: list[Path] = []
    root = Path(run_dir) / NODES
    if not root.is_dir():
        return removed
    for node in sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"node-\d+", p.name)):
        mine = run_state_dir(node, run_key)
        for entry in sorted(node.iterdir()):
            if entry.is_symlink():  # never follow a link out of the run dir
                continue
            if entry.is_dir() and _RUN_FOLDER.fullmatch(entry.name) and entry != mine:
                shutil.rmtree(entry)
                removed.append(entry)
            elif entry.is_file() and _STATE_FILE.fullmatch(entry.name):
                if adopt_flat_files and not entry.name.endswith(".tmp"):
                    mine.mkdir(exist_ok=True)
                    os.replace(entry, mine / entry.name)
                else:
                    entry.unlink()
                    removed.append(entry)
    return removed


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
    """Write round ``server_round``'s ``kind`` file atomically, remove files of later rounds (an abandoned
    future: a rerun from an earlier checkpoint), then prune all but the ``KEEP`` newest files."""
    folder.mkdir(parents=True, exist_ok=True)
    for later in [r for r in _rounds(folder, kind) if r > int(server_round)]:
        (folder / f"{kind}-round-{later}.safetensors").unlink(missing_ok=True)
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
