"""What travels between workers: ``trainable_state`` (trainable parameters + BN running statistics).

Frozen or generated tensors never travel. Payloads may be cast to bf16/fp16 for transport and are cast
back to the receiving model's dtype on load.
"""

from __future__ import annotations

import safetensors.torch
import torch
from torch import nn

BN_STAT_NAMES = ("running_mean", "running_var")
TRANSPORT_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP/DataParallel wrapper (so names carry no ``module.`` prefix)."""
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel)
    return getattr(model, "module", model) if wrapped else model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor for exactly what travels: parameters with ``requires_grad`` and BN running mean/var.

    Shared parameters (e.g. one CSG generator used by all layers) appear once, under their first name.
    Tensors are detached views (no copy); callers that mutate them must clone.
    """
    m = unwrap(model)
    state: dict[str, torch.Tensor] = {}
    for name, p in m.named_parameters():
        if p.requires_grad:
            state[name] = p.detach()
    for name, b in m.named_buffers():
        if name.rsplit(".", 1)[-1] in BN_STAT_NAMES:
            state[name] = b.detach()
    return state


def cast_state(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to the transport dtype (``None``/``"fp32"``/``"bf16"``/``"fp16"``)."""
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype must be one of fp32, bf16, fp16 or None, got {dtype!r}")
    target = TRANSPORT_DTYPES[dtype]
    if target is None:
        return dict(state)
    return {k: (v.to(target) if v.is_floating_point() else v) for k, v in state.items()}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``'s trainable tensors in place, casting to each target's dtype/device.

    Keys must match :func:`trainable_state` exactly; the first mismatch raises a ValueError naming the key.
    """
    _check_layers(model, state)
    target = trainable_state(model)
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise ValueError(
            f"state does not fit {type(unwrap(model)).__name__}: {what} "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    with torch.no_grad():
        for k, dst in target.items():
            src = torch.as_tensor(state[k])
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"state key {k!r}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}"
                )
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    _invalidate_caches(model)


def _check_layers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Let layers that know more (CSG: slice shapes) explain a mismatching state via ``check_state(state, prefix)``."""
    for name, mod in unwrap(model).named_modules():
        check = getattr(mod, "check_state", None)
        if callable(check):
            check(state, f"{name}." if name else "")


def _invalidate_caches(model: nn.Module) -> None:
    """Tell layers that cache derived weights (CSG in eval mode) that their parameters changed."""
    for mod in unwrap(model).modules():
        hook = getattr(mod, "invalidate_cache", None)
        if callable(hook):
            hook()


def serialize_state(state: dict[str, torch.Tensor], dtype: str | None = None) -> bytes:
    """The bytes of a state as sent over the wire by compactfl (safetensors format)."""
    cast = cast_state(state, dtype)
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in cast.items()})


def payload_bytes(model: nn.Module, dtype: str | None = None) -> int:
    """Bytes of ``trainable_state(model)`` serialized for transport, optionally cast to bf16/fp16."""
    return len(serialize_state(trainable_state(model), dtype))
