"""The one registry of architectures: ``build(name, num_classes, **kw)`` and ``list_models()``.

Builders register an exact name (``"resnet56"``) or a pattern family (``"wrn-D-K"`` parsed by a regex).
Every built model carries ``compactfl_spec`` (name, num_classes, kwargs) so it can be rebuilt from JSON.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

Builder = Callable[..., nn.Module]

_EXACT: dict[str, Builder] = {}
_PATTERNS: list[tuple[re.Pattern[str], str, Builder]] = []

SPEC_ATTR = "compactfl_spec"


def register(name: str, *, pattern: str | None = None) -> Callable[[Builder], Builder]:
    """Register a builder under ``name``; with ``pattern`` (a regex) the builder receives the match groups."""

    def deco(fn: Builder) -> Builder:
        if pattern is None:
            if name in _EXACT:
                raise ValueError(f"model {name!r} is registered twice")
            _EXACT[name] = fn
        else:
            _PATTERNS.append((re.compile(pattern), name, fn))
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the architecture modules runs their @register decorators.
    from models import architectures  # noqa: F401


def list_models() -> list[str]:
    """Names accepted by :func:`build` (families are shown by their pattern, e.g. ``wrn-D-K``)."""
    _ensure_loaded()
    return sorted(_EXACT) + sorted(name for _, name, _ in _PATTERNS)


def build(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered architecture by name; unknown names raise a ValueError listing the known ones."""
    _ensure_loaded()
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name in _EXACT:
        model = _EXACT[name](num_classes=num_classes, **kwargs)
    else:
        for regex, _, fn in _PATTERNS:
            m = regex.fullmatch(name)
            if m:
                model = fn(*m.groups(), num_classes=num_classes, **kwargs)
                break
        else:
            raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    setattr(model, SPEC_ATTR, {"name": name, "num_classes": num_classes, "kwargs": dict(kwargs)})
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The spec (name, num_classes, kwargs) that rebuilds ``model``'s compact architecture."""
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise ValueError(f"{type(model).__name__} was not built by models.build and has no model spec")
    return {"name": spec["name"], "num_classes": spec["num_classes"], "kwargs": dict(spec["kwargs"])}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a compact model from :func:`model_spec` output (e.g. a run dir's ``model.json``)."""
    try:
        return build(spec["name"], num_classes=int(spec["num_classes"]), **dict(spec.get("kwargs") or {}))
    except KeyError as exc:
        raise ValueError(f"model spec is missing the key {exc.args[0]!r}: {spec!r}") from None
