"""ONNX export of a run's compact (deploy-time) model, verified with onnxruntime against PyTorch.

Only the compact model is exported: ExpandNets chains are contracted and CSG filters materialised
before ``model.safetensors`` is written, so the ONNX graph holds plain convolutions.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.stages import load_model
from pipeline.tracking import track_artifact


class _LogitsOnly(nn.Module):
    """Wraps a FeatureNet so the exported graph has exactly one input (images) and one output (logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


ONNX_PACKAGES = ("onnx", "onnxscript")  # torch.onnx.export(dynamo=True) needs both (extra: compactfl[onnx])


def missing_onnx_packages() -> list[str]:
    """The ONNX export packages that cannot be imported here (empty when export works)."""
    import importlib

    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def onnx_export(model: nn.Module, path: Path, input_shape: tuple[int, ...], opset: int = 18) -> None:
    """Write ``model`` (eval mode) as a single-file ONNX graph with a dynamic batch dimension."""
    wrapped = _LogitsOnly(model).eval()
    example = torch.randn(*input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(wrapped, (example,), None, input_names=["images"], output_names=["logits"],
                                        opset_version=opset, dynamo=True, external_data=False,
                                        dynamic_shapes={"images": {0: batch}}, verbose=False)
        finally:
            for lg, lv in zip(quiet, levels, strict=True):
                lg.setLevel(lv)
    program.save(str(path), external_data=False)


def check_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...], samples: int = 8,
               seed: int = 0) -> float | None:
    """Max |onnxruntime - PyTorch| / max(1, max |PyTorch|) over ``samples`` random inputs (None: no onnxruntime).

    Relative to the logit scale, because untrained deep nets produce logits in the thousands.
    """
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *input_shape[1:], generator=gen)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if out.shape != ref.shape:
        raise ValueError(f"{path}: onnxruntime output shape {out.shape} differs from PyTorch {ref.shape}")
    return float(np.abs(out - ref).max() / max(1.0, float(np.abs(ref).max())))


def export_onnx(run_dir: Path, out: Path | None = None, *, opset: int = 18, tolerance: float = 1e-3) -> dict[str, Any]:
    """Export ``run_dir``'s compact model to ONNX and verify it; raises ValueError beyond ``tolerance``."""
    run_dir = Path(run_dir)
    model, meta = load_model(run_dir)
    shape = tuple(meta.get("input_shape") or (1, 3, 32, 32))
    path = Path(out) if out is not None else run_dir / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_export(model, path, shape, opset)
    diff = check_onnx(model, path, shape)
    if diff is not None and diff > tolerance:
        raise ValueError(f"{path}: ONNX logits differ from PyTorch by {diff:.3g} (relative) (> {tolerance:g})")
    track_artifact(run_dir, path)
    return {"path": path, "bytes": path.stat().st_size, "max_abs_diff": diff, "samples": 8 if diff is not None else 0}
