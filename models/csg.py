"""CSG compression (Omidvar et al., AISTATS 2021): conv filters generated from codes by one shared generator.

``csg_compress`` swaps every eligible conv of a copy of a model for a :class:`~models.csg_layers.CSGConv2d`
whose filter slices are ``reshape(A @ c_i)``; ``A`` (the ``csg_generator`` of the model, prod(slice) x n_c)
is shared by all those layers. ``materialize`` writes the generated filters back into the plain
architecture. Slices are channel blocks as in the paper's text (see ``models/csg_layers.py``).

Initialisation (variance preserving). A generated weight is ``w = sum_j A[r, j] c_j``; with codes drawn
i.i.d. ``N(0, s_c^2)`` independent of ``A``, ``Var(w_r) = s_c^2 * sum_j A[r, j]^2``, whose mean over the
P = prod(slice) rows r is ``s_c^2 * ||A||_F^2 / P``. Kaiming-normal init (fan-in, ReLU gain) of the
replaced conv has variance ``2 / fan_in`` with ``fan_in = in_channels * kh * kw``. So each layer's codes get
``s_c^2 = 2 * P / (fan_in * ||A||_F^2)``: the layer-dependent scale lives in the codes because ``A`` is
shared. A fresh generator is drawn ``N(0, 1/n_c)`` (``||A||_F^2 ~= P``, so ``s_c^2 ~= 2 / fan_in``); a
BCSG generator is ``sign(N(0, 1)) / sqrt(n_c)`` (``||A||_F^2 = P`` exactly); a passed-in (pre-trained)
generator keeps its weights and the codes adapt to its actual norm. (The official code draws codes with
mean 1e-3 and std 1 and scales its binary generator by 0.5; this follows the derivation instead.)

Eligible layers: plain ungrouped, zero-padded ``nn.Conv2d`` whose kernel equals the slice's spatial shape;
never the first conv of the model (in registration order: the stem that reads the image); 1x1 convs only
with ``include_pointwise=True``, and then, if the model defines ``csg_pointwise_targets`` (fnmatch patterns
of module names), only those. Grouped/depthwise convs (groups > 1) are never eligible: their filter tensor
is (out, in/groups, kh, kw) with each group reading different inputs (depthwise: one channel per filter,
so a 16-channel slice would be mostly cropped away), and the paper compresses only ungrouped convs.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from models.csg_layers import CSGConv2d, SliceGenerator
from models.finalize import replace_reparameterized
from models.state import unwrap

GENERATOR_ATTR = "csg_generator"
_FILE_FORMAT = "compactfl-csg-generator"

__all__ = [
    "CSGConv2d", "SliceGenerator", "csg_compress", "materialize", "save_generator", "load_generator",
    "eligible_convs", "csg_layers",
]


def _check_slice_shape(slice_shape: object) -> tuple[int, int, int, int]:
    try:
        shape = tuple(slice_shape)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"slice_shape must be 4 positive integers (S0, S1, kh, kw), got {slice_shape!r}") from None
    if len(shape) != 4 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"slice_shape must be 4 positive integers (S0, S1, kh, kw), got {slice_shape!r}")
    return shape  # type: ignore[return-value]


def _check_code_size(code_size: object) -> int:
    if not isinstance(code_size, int) or isinstance(code_size, bool) or code_size < 1:
        raise ValueError(f"code_size must be an integer >= 1, got {code_size!r}")
    return code_size


def eligible_convs(model: nn.Module, slice_shape: tuple[int, int, int, int],
                   include_pointwise: bool = False) -> list[str]:
    """Names of the convs of ``model`` that CSG with ``slice_shape`` replaces (see the module docstring)."""
    base = unwrap(model)
    convs = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    patterns = getattr(base, "csg_pointwise_targets", None)
    names = []
    for i, (name, conv) in enumerate(convs):
        if i == 0 or type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros":
            continue
        if tuple(conv.kernel_size) != tuple(slice_shape[2:]):
            continue
        if tuple(conv.kernel_size) == (1, 1):
            if not include_pointwise:
                continue
            if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
        names.append(name)
    return names


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def csg_layers(model: nn.Module) -> list[tuple[str, CSGConv2d]]:
    """(name, layer) for every CSG layer of ``model``, in registration order."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, CSGConv2d)]


def _generator_from(source: nn.Module | torch.Tensor, slice_shape: tuple[int, int, int, int],
                    code_size: int) -> torch.Tensor:
    """The weight (prod(slice), n_c) of a generator given as a SliceGenerator, CSG model, Linear or tensor."""
    if isinstance(source, nn.Module) and not isinstance(source, SliceGenerator | nn.Linear):
        inner = getattr(unwrap(source), GENERATOR_ATTR, None)
        if inner is None:
            raise TypeError(f"generator must be a SliceGenerator, nn.Linear, tensor or CSG model, "
                            f"got {type(source).__name__} without a {GENERATOR_ATTR!r}")
        source = inner
    if isinstance(source, SliceGenerator) and source.shape != slice_shape:
        raise ValueError(f"generator produces slices of shape {list(source.shape)}, "
                         f"but slice_shape is {list(slice_shape)}")
    if isinstance(source, nn.Linear) and source.bias is not None:
        raise ValueError("generator must be bias-free (Linear(n_c -> prod(slice), bias=False))")
    weight = source.weight if isinstance(source, nn.Module) else source
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"generator must be a SliceGenerator, nn.Linear, tensor or CSG model, got {type(source)}")
    want = (math.prod(slice_shape), code_size)
    if tuple(weight.shape) != want:
        raise ValueError(f"generator weight has shape {tuple(weight.shape)}, but slice shape {list(slice_shape)} "
                         f"with code size {code_size} needs {want}")
    return weight.detach()


def _new_generator(slice_shape: tuple[int, int, int, int], code_size: int, *, binary: bool,
                   generator: nn.Module | torch.Tensor | None, train: bool, like: torch.Tensor) -> SliceGenerator:
    gen = SliceGenerator(slice_shape, code_size).to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        if generator is not None:
            gen.weight.copy_(_generator_from(generator, slice_shape, code_size))
        elif binary:
            signs = torch.where(torch.randn_like(gen.weight) >= 0, 1.0, -1.0)
            gen.weight.copy_(signs / math.sqrt(code_size))
        else:
            gen.weight.normal_(0.0, 1.0 / math.sqrt(code_size))
    gen.weight.requires_grad_(train and not binary)
    return gen


def init_codes(layer: CSGConv2d, sq_norm: float) -> None:
    """Draw ``layer.codes`` so its generated filters have Kaiming-normal variance 2 / fan_in (module docstring).

    ``sq_norm`` is the generator's squared Frobenius norm, computed once per model by the caller.
    """
    g = layer.generator.weight.detach()
    if sq_norm == 0.0:
        raise ValueError("the CSG generator is all zeros: codes cannot reach Kaiming variance")
    std = math.sqrt(2.0 * g.shape[0] / (layer.fan_in * sq_norm))
    with torch.no_grad():
        layer.codes.normal_(0.0, std)


def csg_compress(model: nn.Module, slice_shape: tuple[int, int, int, int] = (16, 16, 3, 3), code_size: int = 128,
                 *, binary: bool = False, generator: nn.Module | torch.Tensor | None = None,
                 train_generator: bool = True, include_pointwise: bool = False) -> nn.Module:
    """A copy of ``model`` whose eligible convs are CSG layers sharing one generator (``model.csg_generator``).

    ``generator`` (a SliceGenerator, a CSG model, a bias-free Linear or a weight tensor) is copied in to share
    a pre-trained generator; ``train_generator=False`` freezes it. ``binary=True`` draws a frozen BCSG
    generator. The input model is never modified.
    """
    shape = _check_slice_shape(slice_shape)
    n_c = _check_code_size(code_size)
    if binary and generator is not None:
        raise ValueError("binary=True draws its own random sign generator; pass either binary or generator")
    base = unwrap(model)
    if csg_layers(base):
        raise ValueError(f"{type(base).__name__} is already CSG-compressed")
    targets = eligible_convs(base, shape, include_pointwise)
    if not targets:
        kernels = sorted({tuple(m.kernel_size) for m in base.modules() if isinstance(m, nn.Conv2d)})
        hint = " (1x1 slices need include_pointwise=True)" if shape[2:] == (1, 1) and not include_pointwise else ""
        raise ValueError(f"slice shape {list(shape)} matches no eligible conv of {type(base).__name__} "
                         f"(conv kernels: {kernels}; the first conv is never compressed){hint}")
    out = copy.deepcopy(base)
    like = next(iter(base.parameters()))
    gen = _new_generator(shape, n_c, binary=binary, generator=generator, train=train_generator, like=like)
    sq_norm = float(torch.linalg.vector_norm(gen.weight.detach().double()) ** 2)
    for name in targets:
        conv = out.get_submodule(name)
        layer = CSGConv2d(conv, gen)
        init_codes(layer, sq_norm)
        layer.train(conv.training)
        _replace(out, name, layer)
    setattr(out, GENERATOR_ATTR, gen)
    return out


def materialize(csg_model: nn.Module) -> nn.Module:
    """The plain architecture with the generated filters written in (a copy; the input is untouched).

    The shared finalisation mechanism restricted to CSG layers: each becomes its ``to_compact()`` conv and the
    model-level generator handle goes with them.
    """
    return replace_reparameterized(csg_model, predicate=lambda m: isinstance(m, CSGConv2d))


def _generator_of(model_or_generator: nn.Module) -> SliceGenerator:
    if isinstance(model_or_generator, SliceGenerator):
        return model_or_generator
    gen = getattr(unwrap(model_or_generator), GENERATOR_ATTR, None)
    if not isinstance(gen, SliceGenerator):
        raise TypeError(f"{type(model_or_generator).__name__} is neither a SliceGenerator nor a CSG model")
    return gen


def save_generator(model_or_generator: nn.Module, path: str | Path) -> None:
    """Write a CSG generator (weight + slice shape metadata) to a safetensors file, to share it with other runs."""
    gen = _generator_of(model_or_generator)
    meta = {"format": _FILE_FORMAT, "slice_shape": ",".join(map(str, gen.shape)), "code_size": str(gen.code_size)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"weight": gen.weight.detach().contiguous().cpu()}, str(path), metadata=meta)


def load_generator(path: str | Path) -> SliceGenerator:
    """Read a generator written by :func:`save_generator`; bad files raise a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CSG generator file {str(path)!r} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight = f.get_tensor("weight") if "weight" in f.keys() else None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"CSG generator file {str(path)!r} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != _FILE_FORMAT or weight is None:
        raise ValueError(f"CSG generator file {str(path)!r} was not written by models.csg.save_generator")
    try:
        shape = _check_slice_shape(tuple(int(s) for s in meta["slice_shape"].split(",")))
        code_size = _check_code_size(int(meta["code_size"]))
    except (KeyError, ValueError):
        raise ValueError(f"CSG generator file {str(path)!r} has bad slice_shape/code_size metadata") from None
    gen = SliceGenerator(shape, code_size)
    with torch.no_grad():
        gen.weight.copy_(_generator_from(weight, shape, code_size))
    return gen

