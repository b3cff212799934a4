"""Finalisation: turn a training-time model (expanded or CSG) into the plain compact model for deployment.

Re-parameterised layers share one protocol: a module with a ``to_compact()`` method returns the plain
layer (``nn.Conv2d``/``nn.Linear``) that computes the same function. ``finalize`` replaces every such module
in a copy, so ExpandNets contraction and CSG materialisation go through one mechanism.
"""

from __future__ import annotations

import copy

from torch import nn

from models.state import unwrap


def is_reparameterized(module: nn.Module) -> bool:
    """True for layers that must be converted before deployment (they define ``to_compact``)."""
    return callable(getattr(module, "to_compact", None))


def has_reparameterized(model: nn.Module) -> bool:
    return any(is_reparameterized(m) for m in unwrap(model).modules())


def replace_reparameterized(model: nn.Module, predicate=is_reparameterized) -> nn.Module:
    """A deep copy of ``model`` in which every module matching ``predicate`` is replaced by ``to_compact()``."""
    out = copy.deepcopy(unwrap(model))
    _replace_children(out, predicate)
    for attr in ("csg_generator",):  # model-level handles of shared re-parameterisation state
        if hasattr(out, attr) and not any(is_reparameterized(m) for m in out.modules()):
            try:
                delattr(out, attr)
            except AttributeError:
                pass
    return out


def _replace_children(module: nn.Module, predicate) -> None:
    for name, child in list(module.named_children()):
        if predicate(child):
            setattr(module, name, child.to_compact())
        else:
            _replace_children(child, predicate)


def finalize(model: nn.Module) -> nn.Module:
    """The deployable compact model: contracted (ExpandNets) / materialised (CSG) copy, eval-ready.

    Plain models come back as an equal copy. The input is never modified.
    """
    out = replace_reparameterized(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out
