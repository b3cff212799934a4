"""compactfl models: pure PyTorch architectures, ExpandNets expansion/contraction, CSG, counting, state.

Public API (README "Python API"): ``build``, ``list_models``, ``expand``, ``contract``, ``init_from_expanded``,
``csg_compress``, ``materialize``, ``cheapen``, ``finalize``, ``count_params``, ``count_macs``,
``trainable_state``, ``load_trainable_state``, ``payload_bytes``, ``model_spec``, ``build_from_spec``,
``lift`` (a compact state into an ExpandNet's factors, in place; ``seeded_expansion`` rebuilds the shared
initial factors). ``models.lift`` is the function: import the module's names with ``from models.lift import``.
Nothing here imports Flower or Ray.
"""

from models import cheap, csg, expandnets  # noqa: F401  (submodules: models.csg.load_generator, ...)
from models.cheap import cheapen
from models.counting import count_macs, count_params
from models.csg import csg_compress, materialize
from models.expandnets import contract, expand, init_from_expanded
from models.finalize import finalize, has_reparameterized
from models.lift import LayerLift, LiftReport, balance, lift, seeded_expansion
from models.registry import build, build_from_spec, list_models, model_spec, register
from models.state import (
    cast_state,
    load_trainable_state,
    payload_bytes,
    serialize_state,
    trainable_state,
)

__all__ = [
    "build", "build_from_spec", "list_models", "model_spec", "register",
    "count_macs", "count_params", "finalize", "has_reparameterized",
    "cast_state", "load_trainable_state", "payload_bytes", "serialize_state",
    "trainable_state",
    "expand", "contract", "init_from_expanded", "csg_compress", "materialize", "cheapen",
    "lift", "balance", "seeded_expansion", "LiftReport", "LayerLift",
]
