"""Per-round server checkpoints (safetensors) and resume.

``<run dir>/checkpoints/round-NNNN.safetensors`` holds the global trainable state (``global/<key>``), the
strategy state (``strategy/<attr>/<key>``, e.g. FedAdam moments), the torch and numpy RNG states; its
metadata holds the round, Python's ``random`` state (node sampling), a config fingerprint and the metrics
history as JSON (also written to ``checkpoints/history.json``). Files are written atomically; the newest
:data:`KEEP` are kept. Only safetensors and JSON are read back: no pickle.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from pipeline.config import RunConfig

FORMAT = "compactfl-flower-checkpoint/1"
KEEP = 2
_NAME = re.compile(r"round-(\d{4,})\.safetensors$")
#: config sections that must not change between a run and its resume (rounds/resume/output/name/tracking may).
_FINGERPRINT_IGNORES = {"resume", "output", "name", "tracking"}


@dataclass
class ServerCheckpoint:
    """Everything the server needs to continue after ``round``."""

    round: int
    global_state: dict[str, torch.Tensor]
    strategy_state: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    rng: dict[str, Any]


def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The parts of the config a resume must share with the interrupted run."""
    raw = cfg.model_dump(mode="json")
    raw = {k: v for k, v in raw.items() if k not in _FINGERPRINT_IGNORES}
    raw["engine"] = {k: v for k, v in raw["engine"].items() if k not in ("rounds", "round_timeout")}
    return raw


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch RNG states of the server process."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def _python_rng_to_json(state: tuple) -> str:
    version, internal, gauss = state
    return json.dumps([version, list(internal), gauss])


def _python_rng_from_json(text: str) -> tuple:
    version, internal, gauss = json.loads(text)
    return version, tuple(internal), gauss


def save_checkpoint(ckpt_dir: Path, ckpt: ServerCheckpoint, cfg: RunConfig) -> Path:
    """Write one round's checkpoint atomically, prune old ones, return its path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {f"global/{k}": v.detach().cpu().float().numpy()
                                      for k, v in ckpt.global_state.items()}
    tensors.update({f"strategy/{k}": np.ascontiguousarray(v) for k, v in ckpt.strategy_state.items()})
    name, keys, pos, has_gauss, cached = ckpt.rng["numpy"]
    tensors["rng/numpy_keys"] = np.asarray(keys, dtype=np.uint32)
    tensors["rng/torch"] = ckpt.rng["torch"].numpy()
    history_json = json.dumps(ckpt.history, default=float)
    metadata = {
        "format": FORMAT,
        "round": str(ckpt.round),
        "python_rng": _python_rng_to_json(ckpt.rng["python"]),
        "numpy_rng": json.dumps([name, int(pos), int(has_gauss), float(cached)]),
        "config": json.dumps(config_fingerprint(cfg), sort_keys=True),
        "history": history_json,
    }
    path = ckpt_dir / f"round-{ckpt.round:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    safetensors.numpy.save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    (ckpt_dir / "history.tmp").write_text(history_json)
    os.replace(ckpt_dir / "history.tmp", ckpt_dir / "history.json")
    for old in list_checkpoints(ckpt_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, cfg: RunConfig | None = None) -> ServerCheckpoint:
    """Read a checkpoint; with ``cfg``, refuse one written under a different config (names the section)."""
    path = Path(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    if cfg is not None:
        saved = json.loads(metadata["config"])
        now = config_fingerprint(cfg)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(f"resume: {path} was written with a different config (section {diff[0]!r} differs)")
    name, pos, has_gauss, cached = json.loads(metadata["numpy_rng"])
    rng = {
        "python": _python_rng_from_json(metadata["python_rng"]),
        "numpy": (name, tensors["rng/numpy_keys"], pos, has_gauss, cached),
        "torch": torch.from_numpy(tensors["rng/torch"].copy()),
    }
    return ServerCheckpoint(
        round=int(metadata["round"]),
        global_state={k[len("global/"):]: torch.from_numpy(v.copy()) for k, v in tensors.items()
                      if k.startswith("global/")},
        strategy_state={k[len("strategy/"):]: v for k, v in tensors.items() if k.startswith("strategy/")},
        history=json.loads(metadata["history"]),
        rng=rng,
    )


def latest_checkpoint(ckpt_dir: Path, cfg: RunConfig | None = None) -> ServerCheckpoint | None:
    """The newest checkpoint of a run dir's ``checkpoints/`` (None when there is none)."""
    found = list_checkpoints(ckpt_dir)
    return load_checkpoint(found[-1], cfg) if found else None
