"""The one checkpoint module of every engine: safetensors for tensors + JSON for the rest, one file, no pickle.

- RNG: :func:`capture_rng` / :func:`restore_rng` (Python, numpy, torch), stored with every checkpoint.
- Config fingerprint: the whole resolved config. :func:`check_resume` refuses a resume whose config would
  change the training outcome and names the first differing key path; only :data:`RESUME_MAY_CHANGE` may
  differ and :data:`RESUME_MAY_GROW` may grow (a cosine horizon then moves: logged).
- Epoch checkpoints (local and Ray engines): model, optimizer, RNG, completed epochs, history
  (``<folder>/checkpoint.safetensors``; the local engine uses ``<run dir>/checkpoints/``, Ray workers a
  Ray Train checkpoint folder).
- Round checkpoints (Flower server): global trainable state, strategy state (e.g. FedAdam moments), RNG,
  round, history, the run key that names the nodes' state folders (``pipeline.transport.node_store``; None in
  a checkpoint from before run keys) (``<run dir>/checkpoints/round-NNNN.safetensors``; checkpoints of later
  rounds, left by an earlier run or an abandoned future, are removed, then the newest :data:`KEEP` kept; plus
  ``history.json``).
- Both carry optional per-node state (:class:`NodeState`: a dict of tensors + JSON under a namespace).

Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from pipeline.config import ConfigError, RunConfig, communicate_mode
from pipeline.logging_utils import get_logger

log = get_logger("checkpoint")
FORMAT = "compactfl-checkpoint/2"
EPOCH_FILE = "checkpoint.safetensors"
KEEP = 2
_ROUND_FILE = re.compile(r"round-(\d{4,})\.safetensors$")

#: config keys that may differ between a run and its resume: they do not change what is trained.
RESUME_MAY_CHANGE = ("output", "name", "resume", "tracking", "engine.round_timeout", "engine.max_failures",
                     "engine.address")
#: config keys that may grow on resume (the run is extended); a cosine schedule's horizon moves with them.
RESUME_MAY_GROW = ("train.epochs", "engine.rounds")


class ResumeError(ConfigError):
    """A resume whose checkpoint cannot continue this config (message: one line, names the first key)."""


@dataclass
class NodeState:
    """Extra per-node state a checkpoint carries under a namespace (e.g. a codec's error-feedback residual)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU) RNG states of this process."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def _rng_to_file(rng: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    version, internal, gauss = rng["python"]
    tensors = {"rng/torch": rng["torch"].clone(), "rng/numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(internal), gauss]}


def _rng_from_file(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    kind, pos, has_gauss, cached = meta["numpy"]
    version, internal, gauss = meta["python"]
    return {"python": (version, tuple(internal), gauss),
            "numpy": (kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
            "torch": tensors["rng/torch"].clone()}


# ------------------------------------------------------------------------------------------- files
def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` (safetensors) with ``meta`` (JSON, in the file's metadata) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}  # no shared storage
    safetensors.torch.save_file(data, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta, default=float)})
    os.replace(tmp, path)
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a file written by :func:`write_checkpoint`; a clear error for anything else."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (OSError, safetensors.SafetensorError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {header.get('format')!r})")
    return tensors, json.loads(header["meta"])


def _extra_to_file(extra: dict[str, NodeState]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {}
    for ns, state in extra.items():
        if "/" in ns:
            raise ValueError(f"checkpoint: node-state namespace {ns!r} must not contain '/'")
        tensors.update({f"extra/{ns}/{k}": v for k, v in state.tensors.items()})
        meta[ns] = state.meta
    return tensors, meta


def _extra_from_file(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, NodeState]:
    out = {ns: NodeState(meta=m) for ns, m in meta.items()}
    for name, t in tensors.items():
        if name.startswith("extra/"):
            _, ns, key = name.split("/", 2)
            out.setdefault(ns, NodeState()).tensors[key] = t
    return out


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------- fingerprint
def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint records of its config: the whole resolved config (JSON types), with the effective
    ``transport.communicate`` (so a flipped default is a change a resume refuses)."""
    doc = cfg.model_dump(mode="json")
    doc["transport"]["communicate"] = communicate_mode(cfg)
    return doc


def _with_communicate(saved: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint written before ``transport.communicate`` existed: flower ExpandNets then sent factors."""
    transport = saved.get("transport")
    if not isinstance(transport, dict) or "communicate" in transport:
        return saved
    expand_on_flower = (saved.get("engine", {}).get("kind") == "flower"
                        and saved.get("compression", {}).get("kind") == "expand")
    return {**saved, "transport": {**transport, "communicate": "factors" if expand_on_flower else None}}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _allowed(path: str) -> bool:
    return any(path == key or path.startswith(key + ".") for key in RESUME_MAY_CHANGE)


def check_resume(saved: dict[str, Any], cfg: RunConfig, where: Path | str,
                 remedy: str = "use another name/output or resume: false") -> None:
    """Refuse (:class:`ResumeError`) a resume of ``cfg`` from a checkpoint written under ``saved``.

    The first differing key path (in schema order) is named; :data:`RESUME_MAY_CHANGE` keys are ignored and
    :data:`RESUME_MAY_GROW` keys may grow (a cosine schedule's horizon then moves: a warning says so).
    ``remedy`` ends the message (what the user can do instead).
    """
    old, now = _flatten(_with_communicate(saved)), _flatten(config_fingerprint(cfg))
    for path in [*now, *(p for p in old if p not in now)]:
        if _allowed(path) or old.get(path, "<absent>") == now.get(path, "<absent>"):
            continue
        if path in RESUME_MAY_GROW and isinstance(old.get(path), int) and isinstance(now.get(path), int):
            if now[path] > old[path]:
                if cfg.train.schedule == "cosine":
                    log.warning("resume: %s grows from %d to %d: the cosine schedule's horizon moves, so the "
                                "remaining epochs get other learning rates than the first part planned",
                                path, old[path], now[path])
                continue
            raise ResumeError(f"resume: {where} was written with {path}={old[path]}; a resume may only extend it "
                              f"(got {now[path]}); {remedy}")
        raise ResumeError(f"resume: {where} was written with a different {path} ({old.get(path, '<absent>')!r}, "
                          f"now {now.get(path, '<absent>')!r}); only {', '.join(RESUME_MAY_CHANGE)} may change and "
                          f"{', '.join(RESUME_MAY_GROW)} grow; {remedy}")


# ------------------------------------------------------------------------------ epoch checkpoints
def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``<param>/<key>``) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt_state["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}/{key}"] = v.detach().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = t
    for pid, rest in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(rest)
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class EpochResume:
    """What :func:`load_epoch_checkpoint` hands back besides the restored model/optimizer/RNG."""

    epoch: int
    history: list[dict[str, Any]]
    extra: dict[str, NodeState]


def has_epoch_checkpoint(folder: Path) -> bool:
    """True when ``folder`` holds an epoch checkpoint."""
    return (Path(folder) / EPOCH_FILE).is_file()


def save_epoch_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                          history: list[dict[str, Any]], cfg: RunConfig,
                          extra: dict[str, NodeState] | None = None) -> Path:
    """Write the training state after ``epoch`` completed epochs to ``folder/checkpoint.safetensors``."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update({f"optim/{k}": v for k, v in opt_tensors.items()})
    rng_tensors, rng_meta = _rng_to_file(capture_rng())
    extra_tensors, extra_meta = _extra_to_file(extra or {})
    tensors.update({**rng_tensors, **extra_tensors})
    meta = {"kind": "epoch", "epoch": epoch, "history": history, "config": config_fingerprint(cfg),
            "optimizer": opt_meta, "rng": rng_meta, "extra": extra_meta}
    return write_checkpoint(Path(folder) / EPOCH_FILE, tensors, meta)


def epoch_checkpoint_config(folder: Path) -> dict[str, Any]:
    """The config an epoch checkpoint was written with (for a resume check before any worker starts)."""
    return read_checkpoint(Path(folder) / EPOCH_FILE)[1]["config"]


def load_epoch_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                          cfg: RunConfig) -> EpochResume:
    """Restore model, optimizer and RNGs in place after :func:`check_resume` accepted ``cfg``."""
    path = Path(folder) / EPOCH_FILE
    tensors, meta = read_checkpoint(path)
    if meta.get("kind") != "epoch":
        raise ValueError(f"{path}: not an epoch checkpoint (kind {meta.get('kind')!r})")
    check_resume(meta["config"], cfg, path)
    model.load_state_dict(_section(tensors, "model/"), strict=True)  # bumps versions: CSG eval caches go stale
    optimizer.load_state_dict(_unflatten_optimizer(_section(tensors, "optim/"), meta["optimizer"]))
    restore_rng(_rng_from_file(tensors, meta["rng"]))
    return EpochResume(int(meta["epoch"]), list(meta["history"]), _extra_from_file(tensors, meta.get("extra", {})))


# ------------------------------------------------------------------------------ round checkpoints
@dataclass
class ServerCheckpoint:
    """Everything the Flower server needs to continue after ``round``."""

    round: int
    global_state: dict[str, torch.Tensor]
    strategy_state: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    rng: dict[str, Any]
    extra: dict[str, NodeState] = field(default_factory=dict)
    run_key: str | None = None  # the run the nodes' stored state belongs to; None: written before run keys


def save_round_checkpoint(ckpt_dir: Path, ckpt: ServerCheckpoint, cfg: RunConfig) -> Path:
    """Write one round's checkpoint (and ``history.json``) atomically, prune old ones, return its path."""
    ckpt_dir = Path(ckpt_dir)
    tensors = {f"global/{k}": v.detach().cpu().float() for k, v in ckpt.global_state.items()}
    tensors.update({f"strategy/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in ckpt.strategy_state.items()})
    rng_tensors, rng_meta = _rng_to_file(ckpt.rng)
    extra_tensors, extra_meta = _extra_to_file(ckpt.extra)
    tensors.update({**rng_tensors, **extra_tensors})
    meta = {"kind": "round", "round": ckpt.round, "history": ckpt.history, "config": config_fingerprint(cfg),
            "rng": rng_meta, "extra": extra_meta, **({"run_key": ckpt.run_key} if ckpt.run_key else {})}
    path = write_checkpoint(ckpt_dir / f"round-{ckpt.round:04d}.safetensors", tensors, meta)
    (ckpt_dir / "history.tmp").write_text(json.dumps(ckpt.history, default=float))
    os.replace(ckpt_dir / "history.tmp", ckpt_dir / "history.json")
    for later in [p for p in list_round_checkpoints(ckpt_dir) if _round_of(p) > ckpt.round]:
        later.unlink(missing_ok=True)  # an earlier run's (or an abandoned future's) rounds never outrank this one
    for old in list_round_checkpoints(ckpt_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def _round_of(path: Path) -> int:
    match = _ROUND_FILE.search(path.name)
    return int(match.group(1)) if match else -1


def list_round_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Round checkpoint files of a run, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).iterdir() if (m := _ROUND_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def load_round_checkpoint(path: Path, cfg: RunConfig | None = None) -> ServerCheckpoint:
    """Read a round checkpoint; with ``cfg``, :func:`check_resume` first (names the first differing key)."""
    tensors, meta = read_checkpoint(path)
    if meta.get("kind") != "round":
        raise ValueError(f"{path}: not a round checkpoint (kind {meta.get('kind')!r})")
    if cfg is not None:
        check_resume(meta["config"], cfg, path)
    return ServerCheckpoint(
        round=int(meta["round"]), global_state=_section(tensors, "global/"),
        strategy_state={k: v.numpy() for k, v in _section(tensors, "strategy/").items()},
        history=list(meta["history"]), rng=_rng_from_file(tensors, meta["rng"]),
        extra=_extra_from_file(tensors, meta.get("extra", {})),
        run_key=meta.get("run_key"),
    )


def latest_round_checkpoint(ckpt_dir: Path, cfg: RunConfig | None = None) -> ServerCheckpoint | None:
    """The newest round checkpoint in ``ckpt_dir`` (None when there is none)."""
    found = list_round_checkpoints(ckpt_dir)
    return load_round_checkpoint(found[-1], cfg) if found else None
