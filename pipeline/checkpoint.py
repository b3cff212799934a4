"""Resumable local-engine checkpoints: safetensors for tensors + JSON for the rest (no pickle).

A checkpoint holds the training model's state_dict, the optimizer state, the RNG states and the history
so far, written atomically after every epoch into a folder as ``checkpoint.safetensors`` + ``checkpoint.json``
(the local engine uses ``<run dir>/checkpoints/``; Ray workers write them into Ray Train checkpoint folders).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"
CKPT_FORMAT = "compactfl-checkpoint/1"


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim/<param>/<key>``) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt_state["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = v.detach().clone().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = t
    for pid, rest in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(rest)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    history: list[dict[str, Any]], fingerprint: dict[str, Any]) -> None:
    """Atomically write the state after ``epoch`` completed epochs (tensors, then the JSON that names them)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().clone().contiguous().cpu() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    np_state = np.random.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    meta = {
        "format": CKPT_FORMAT, "epoch": epoch, "history": history, "fingerprint": fingerprint,
        "optimizer": opt_meta, "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_rng": _python_rng_to_json(random.getstate()),
    }
    tmp_t, tmp_m = run_dir / (CKPT_TENSORS + ".tmp"), run_dir / (CKPT_META + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp_t))
    tmp_m.write_text(json.dumps(meta))
    os.replace(tmp_t, run_dir / CKPT_TENSORS)
    os.replace(tmp_m, run_dir / CKPT_META)


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def has_checkpoint(run_dir: Path) -> bool:
    """True when both checkpoint files exist in ``run_dir``."""
    return (Path(run_dir) / CKPT_TENSORS).is_file() and (Path(run_dir) / CKPT_META).is_file()


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Restore model, optimizer and RNGs in place; returns (completed epochs, history so far).

    A checkpoint written for a different model/compression/seed (``fingerprint``) is refused.
    """
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / CKPT_META).read_text())
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(f"{run_dir / CKPT_META}: not a {CKPT_FORMAT} file")
    if meta.get("fingerprint") != fingerprint:
        diff = sorted(k for k in fingerprint if meta.get("fingerprint", {}).get(k) != fingerprint[k])
        raise ValueError(f"resume: checkpoint in {run_dir} was written with different {', '.join(diff)}; "
                         "use another output/name or resume: false")
    tensors = safetensors.torch.load_file(str(run_dir / CKPT_TENSORS))
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    model.load_state_dict(model_state, strict=True)  # bumps parameter versions: CSG eval caches go stale
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng/torch"])
    kind, pos, has_gauss, cached = meta["numpy_rng"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return int(meta["epoch"]), list(meta["history"])
