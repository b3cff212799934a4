"""Teacher stage: load a frozen teacher from a checkpoint, or train one with the shared loop and save it.

``get_teacher(cfg, device)`` returns ``None`` without a ``teacher`` section, else a frozen module (eval mode,
``requires_grad=False``; the distillation losses call it under ``torch.no_grad()``):

- ``teacher.checkpoint``: a ``model.safetensors`` (or a run dir holding one) with ``model.json`` beside it
  (the registry spec, as written by :func:`pipeline.stages.save_model`). A checkpoint that does not fit the
  spec raises a ValueError naming the first mismatched key.
- ``teacher.model`` (+ optional ``teacher.train``): trained on the run's data with :func:`pipeline.train.fit`
  and saved into ``<run dir>/teacher/``; a later call with the same teacher settings (a resumed run, a
  worker of the same run) loads that copy instead of training again.
- ``teacher.cache_logits``: wrap the teacher in :class:`LogitCache` (only valid without augmentation).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

import models
from pipeline.config import NoCompression, NoDistill, RunConfig
from pipeline.logging_utils import get_logger

TEACHER_DIR = "teacher"
log = get_logger("teacher")


# ------------------------------------------------------------------------------------------ freezing
def freeze(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Eval mode, no gradients, on ``device``: how every teacher is used."""
    model = models.state.unwrap(model).to(device)
    model.requires_grad_(False)
    return model.eval()


class LogitCache(nn.Module):
    """A teacher wrapper that remembers logits per input sample (keyed by a hash of the image tensor).

    Only sound when a sample's tensor is the same every epoch, i.e. without random augmentation. Feature
    requests (attention transfer) bypass the cache.
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self._cache: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        super().train(False)

    def train(self, mode: bool = True) -> LogitCache:  # noqa: D102 - a teacher never leaves eval mode
        return super().train(False)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.teacher.forward_features(x)

    @staticmethod
    def _keys(x: torch.Tensor) -> list[bytes]:
        rows = x.detach().reshape(x.shape[0], -1).contiguous().cpu().numpy()
        return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]

    def forward(self, x: torch.Tensor, return_features: bool = False):  # noqa: D102
        if return_features:
            return self.teacher(x, return_features=True)
        keys = self._keys(x)
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            out = self.teacher(x[missing])
            for j, i in enumerate(missing):
                self._cache[keys[i]] = out[j].detach()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self._cache[k] for k in keys]).to(x.device)

    def __len__(self) -> int:
        return len(self._cache)


# ------------------------------------------------------------------------------------------- loading
def _read_spec(meta_path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"teacher checkpoint: {meta_path} is not valid JSON ({exc.msg})") from None
    spec = doc.get("spec", doc) if isinstance(doc, dict) else None
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"teacher checkpoint: {meta_path} holds no model spec (expected 'spec' with a 'name')")
    return spec


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise a ValueError naming the first key where ``state`` does not fit ``model`` (missing/extra/shape)."""
    expected = dict(model.state_dict())
    problems: list[str] = []
    for k, v in expected.items():
        if k not in state:
            if not k.endswith("num_batches_tracked"):  # optional: trainable_state() files leave it out
                problems.append(f"missing key {k!r}")
        elif tuple(state[k].shape) != tuple(v.shape):
            problems.append(f"key {k!r} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}")
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    if problems:
        raise ValueError(f"{where}: first mismatched key: {problems[0]} ({len(problems)} mismatches in all)")


def load_teacher_checkpoint(path: str | Path, num_classes: int | None = None) -> nn.Module:
    """Rebuild a model from ``model.safetensors`` + the ``model.json`` beside it (a run dir also works)."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    meta_path = weights.with_name("model.json")
    if not weights.is_file():
        raise ValueError(f"teacher.checkpoint: {weights} does not exist")
    if not meta_path.is_file():
        raise ValueError(f"teacher.checkpoint: no model.json beside {weights} (it names the architecture)")
    spec = _read_spec(meta_path)
    if num_classes is not None and int(spec.get("num_classes", -1)) != num_classes:
        raise ValueError(
            f"teacher.checkpoint: {meta_path} is a {spec.get('num_classes')}-class model, the data have {num_classes}"
        )
    try:
        model = models.build_from_spec(spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"teacher.checkpoint: {meta_path}: cannot build its model: {exc}") from None
    try:
        state = safetensors.torch.load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"teacher.checkpoint: {weights} is not a safetensors file ({exc})") from None
    check_state_fits(model, state, f"teacher checkpoint {weights} does not fit {spec['name']} ({meta_path.name})")
    model.load_state_dict(state, strict=False)
    return model


# ------------------------------------------------------------------------------------------ training
def teacher_run_config(cfg: RunConfig) -> RunConfig:
    """The config a teacher trains under: the run's data and seed, the teacher's model and schedule."""
    tc = cfg.teacher
    if tc is None or tc.model is None:
        raise ValueError("teacher.model is required to train a teacher")
    return cfg.model_copy(update={
        "model": tc.model, "train": tc.train or cfg.train, "compression": NoCompression(),
        "distill": NoDistill(), "teacher": None, "name": f"{cfg.name or 'run'}-teacher",
    })


def _fingerprint(tcfg: RunConfig) -> dict[str, Any]:
    dump = tcfg.model_dump(mode="json")
    return {k: dump[k] for k in ("seed", "data", "model", "train")}


def train_teacher(cfg: RunConfig, device: torch.device | str = "cpu", out_dir: Path | None = None) -> nn.Module:
    """Train ``cfg.teacher.model`` with the shared loop on the run's data; save it into ``out_dir``."""
    from pipeline.data import test_loader, train_loader
    from pipeline.modeling import build_training_model
    from pipeline.stages import save_model
    from pipeline.train import fit

    tcfg = teacher_run_config(cfg)
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg.run_dir) / TEACHER_DIR
    model = build_training_model(tcfg).to(device)
    log.info("training teacher %s for %d epochs", tcfg.model.name, tcfg.train.epochs)

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        log.info("teacher epoch %d: train loss %.4f, test accuracy %.4f", epoch + 1, record["train_loss"],
                 record.get("test_accuracy", float("nan")))

    with torch.random.fork_rng(devices=[]):  # reproducible teacher; the caller's RNG streams stay untouched
        torch.manual_seed(tcfg.seed)
        history = fit(model, train_loader(tcfg), tcfg.train, device=device,
                      test_loader=test_loader(tcfg), on_epoch=on_epoch)
    model = model.cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, models.model_spec(model), out_dir,
               {"teacher_fingerprint": _fingerprint(tcfg), "history": history})
    return model


def _saved_teacher(cfg: RunConfig, out_dir: Path) -> nn.Module | None:
    """The teacher saved by an earlier call for the same teacher settings, if any."""
    meta_path = out_dir / "model.json"
    if not (out_dir / "model.safetensors").is_file() or not meta_path.is_file():
        return None
    try:
        doc = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    if doc.get("teacher_fingerprint") != _fingerprint(teacher_run_config(cfg)):
        return None
    return load_teacher_checkpoint(out_dir, cfg.data.num_classes)


# -------------------------------------------------------------------------------------------- entry
def get_teacher(cfg: RunConfig, device: torch.device | str = "cpu") -> nn.Module | None:
    """The frozen teacher of ``cfg`` (loaded, reused from the run dir, or trained); None when the run does not
    distil (no teacher section, or ``distill.kind: none``), so no teacher is ever trained for nothing."""
    tc = cfg.teacher
    if tc is None or cfg.distill.kind == "none":
        return None
    if tc.cache_logits and cfg.data.augment:
        raise ValueError("teacher.cache_logits needs data.augment: false (augmented inputs change every epoch)")
    if tc.checkpoint is not None:
        model = load_teacher_checkpoint(tc.checkpoint, cfg.data.num_classes)
        log.info("teacher loaded from %s", tc.checkpoint)
    else:
        out_dir = Path(cfg.run_dir) / TEACHER_DIR
        model = _saved_teacher(cfg, out_dir)
        if model is None:
            model = train_teacher(cfg, device, out_dir)
        else:
            log.info("teacher reused from %s", out_dir)
    model = freeze(model, device)
    return LogitCache(model) if tc.cache_logits else model
