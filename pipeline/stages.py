"""Run stages shared by every engine: prepare the run dir, then finalise -> evaluate -> save -> report.

Every engine (local, Flower, Ray) calls :func:`prepare_run_dir` first and :func:`finish_run` last, so all
run dirs hold the same files: ``config.yaml``, ``model.safetensors`` + ``model.json``, ``metrics.json``,
``report.md``, PNG plots and ``run.log``. :func:`load_run` rebuilds the compact model from a run dir
(registry spec + safetensors; never pickle).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

import models
from pipeline.config import RunConfig, dump_config
from pipeline.logging_utils import attach_run_log, get_logger
from pipeline.tracking import track_finish

MODEL_FORMAT = "compactfl-model/1"
INPUT_SHAPE = (1, 3, 32, 32)
RUN_FILES = ("config.yaml", "model.safetensors", "model.json", "metrics.json", "report.md")
_STARTED: dict[str, float] = {}
log = get_logger("stages")


# --------------------------------------------------------------------------------------------- prepare
def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create ``cfg.output/cfg.name``, write the resolved ``config.yaml`` and start logging into ``run.log``."""
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output: cannot create run dir {str(run_dir)!r}: {exc.strerror}") from None
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    attach_run_log(run_dir)
    _STARTED[str(run_dir.resolve())] = time.perf_counter()
    log.info("run dir: %s", run_dir)
    return run_dir


# ------------------------------------------------------------------------------------------- counting
def train_time_model_for_counting(cfg: RunConfig) -> nn.Module:
    """A fresh training model whose MACs are the train-time cost of one forward pass.

    Fresh, so that CSG layers have no cached filters (every training forward regenerates them) and the
    count never depends on what the trained copy did last; ExpandNets counts the explicit (unfused) chain,
    the paper's convention.
    """
    from pipeline.modeling import build_compact_model, build_training_model

    comp = cfg.compression
    if comp.kind == "expand" and comp.mode != "explicit":
        return models.expand(build_compact_model(cfg), comp.strategy, rate=comp.rate, mode="explicit",
                             skip_unsupported=comp.skip_unsupported)
    return build_training_model(cfg)


def model_costs(cfg: RunConfig, trained: nn.Module, compact: nn.Module) -> dict[str, int]:
    """Train-time vs deploy-time parameters, MACs and per-transfer payload bytes (fp32)."""
    counted = train_time_model_for_counting(cfg)
    return {
        "params_train": models.count_params(trained),
        "params_deploy": models.count_params(compact),
        "params_deploy_with_bn_stats": models.count_params(compact, include_buffers=True),
        "macs_train": models.count_macs(counted, INPUT_SHAPE),
        "macs_deploy": models.count_macs(compact, INPUT_SHAPE),
        "payload_bytes_train": models.payload_bytes(trained),
        "payload_bytes_deploy": models.payload_bytes(compact),
    }


def communication_totals(history: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, int]:
    """Bytes exchanged: engine totals from ``extra`` when given, else summed over the history records."""
    totals: dict[str, int] = {}
    for key in ("bytes_up", "bytes_down", "bytes_allreduce"):
        if key in extra:
            totals[key] = int(extra[key])
        elif any(key in r for r in history):
            totals[key] = int(sum(r.get(key, 0) or 0 for r in history))
    totals["bytes_total"] = sum(totals.values())
    return totals


# --------------------------------------------------------------------------------------------- saving
def compact_spec(cfg: RunConfig, compact: nn.Module) -> dict[str, Any]:
    """Registry spec that rebuilds ``compact`` (from the model itself, else from the config)."""
    try:
        return models.model_spec(compact)
    except ValueError:
        return {"name": cfg.model.name, "num_classes": cfg.data.num_classes, "kwargs": dict(cfg.model.kwargs)}


def save_model(compact: nn.Module, spec: dict[str, Any], run_dir: Path, info: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (state_dict of the compact model) and ``model.json`` (spec + info)."""
    state = {k: v.detach().clone().contiguous().cpu() for k, v in compact.state_dict().items()}
    safetensors.torch.save_file(state, str(run_dir / "model.safetensors"), metadata={"format": MODEL_FORMAT})
    doc = {"format": MODEL_FORMAT, "spec": spec, "input_shape": list(INPUT_SHAPE), **info}
    (run_dir / "model.json").write_text(json.dumps(doc, indent=2, default=str))


def load_model(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the compact model of a run dir from ``model.json`` + ``model.safetensors`` (eval mode)."""
    run_dir = Path(run_dir)
    meta_path, weights = run_dir / "model.json", run_dir / "model.safetensors"
    for p in (meta_path, weights):
        if not p.is_file():
            raise ValueError(f"run dir {str(run_dir)!r} has no {p.name} (not a finished compactfl run?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc.msg})") from None
    if meta.get("format") != MODEL_FORMAT or "spec" not in meta:
        raise ValueError(f"{meta_path}: not a {MODEL_FORMAT} file")
    model = models.build_from_spec(meta["spec"])
    state = safetensors.torch.load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{weights}: weights do not fit {meta['spec']['name']}: {first}") from None
    return model.eval(), meta


def load_run(run_dir: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(compact model, model.json contents, metrics.json contents) of a finished run dir."""
    model, meta = load_model(run_dir)
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return model, meta, metrics


def _json_safe(obj: Any) -> Any:
    """Replace NaN/inf floats by None so metrics.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if (isinstance(obj, torch.Tensor) and obj.numel() == 1) or isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------- finishing
@torch.no_grad()
def _finalize_gap(trained: nn.Module, compact: nn.Module, loader, device: torch.device) -> float:
    """Max |logit difference| between the trained and finalised model on one test batch (should be ~0)."""
    x, _ = next(iter(loader))
    x = x.to(device)
    net = models.state.unwrap(trained)
    was = net.training
    net.eval()
    try:
        return float((net(x) - compact(x)).abs().max().item())
    finally:
        net.train(was)


def finish_run(cfg: RunConfig, trained_model: nn.Module, history: list[dict[str, Any]], run_dir: Path, *,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Finalise, evaluate, save and report a trained model; returns the run summary (also in metrics.json)."""
    from pipeline.data import test_loader
    from pipeline.report import write_run_report
    from pipeline.train import evaluate, resolve_device

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    device = resolve_device(cfg.device)
    trained = models.state.unwrap(trained_model).to(device)
    compact = models.finalize(trained).to(device).eval()
    loader = test_loader(cfg)
    metrics = evaluate(compact, loader, device)
    gap = _finalize_gap(trained, compact, loader, device)
    trained, compact = trained.cpu(), compact.cpu()
    costs = model_costs(cfg, trained, compact)
    spec = compact_spec(cfg, compact)
    save_model(compact, spec, run_dir, {"compression": cfg.compression.model_dump(mode="json"),
                                        "params": costs["params_deploy"], "macs": costs["macs_deploy"]})
    started = _STARTED.get(str(run_dir.resolve()))
    wall = extra.pop("wall_seconds", None)  # an engine may know better (e.g. a driver in another process)
    if wall is None:  # prepare_run_dir -> now: teacher, training, finalisation and evaluation
        wall = time.perf_counter() - started if started is not None else sum(r.get("seconds", 0.0) for r in history)
    summary: dict[str, Any] = {
        "name": cfg.name or run_dir.name,
        "engine": cfg.engine.kind,
        "model": cfg.model.name,
        "compression": _describe_compression(cfg),
        "distill": cfg.distill.kind,
        "seed": cfg.seed,
        **costs,
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "test_samples": metrics["test_samples"],
        "finalize_max_abs_diff": gap,
        "final_train_loss": history[-1].get("train_loss") if history else None,
        "final_train_accuracy": history[-1].get("train_accuracy") if history else None,
        "steps": len(history),
        **communication_totals(history, extra),
        "wall_seconds": float(wall),
    }
    summary.update({k: v for k, v in extra.items() if k not in summary})
    doc = {"summary": summary, "history": history, "extra": extra}
    (run_dir / "metrics.json").write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False))
    write_run_report(run_dir, _json_safe(summary), _json_safe(history), dump_config(cfg))
    log.info("finished %s: test accuracy %.4f (deploy params %d, MACs %d)", summary["name"],
             summary["test_accuracy"], costs["params_deploy"], costs["macs_deploy"])
    track_finish(cfg, run_dir, history, _json_safe(summary))
    return summary


def _describe_compression(cfg: RunConfig) -> str:
    """Short human label for the compression of a run (``expand ck r=4``, ``csg (16,16,3,3) n=128``...)."""
    c = cfg.compression
    if c.kind == "expand":
        return f"expand {c.strategy} r={c.rate:g}"
    if c.kind == "csg":
        return f"csg {'x'.join(map(str, c.slice_shape))} n={c.code_size}" + (" binary" if c.binary else "")
    if c.kind == "cheap":
        return f"cheap {c.block}"
    return "none"
