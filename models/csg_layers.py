"""CSG building blocks: the shared slice generator and the conv layer whose filters it generates from codes.

Slicing follows the CSG paper (Omidvar et al. 2021, Sec. 2.1.1 and Fig. 1), not the official code: a slice
is a channel block ``W[a*S0:(a+1)*S0, b*S1:(b+1)*S1, :, :]`` of the filter tensor (``S0`` filters by ``S1``
input channels by the full kernel). The official code instead reshapes the generated vectors into a
contiguous run of the flattened weight. Both use ``ceil(out/S0) * ceil(in/S1)`` codes per layer; partial
blocks at the end are generated whole and cropped (the paper's footnote 2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _shape_str(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class SliceGenerator(nn.Module):
    """The shared CSG: ``Linear(n_c -> prod(slice_shape), bias=False)``; ``weight`` has shape (prod(slice), n_c).

    It also holds ``slice_shape`` as a persistent int64 buffer so that a ``state_dict`` records which slice
    shape produced it; loading one saved with another slice shape raises a ValueError naming both.
    """

    def __init__(self, slice_shape: tuple[int, int, int, int], code_size: int) -> None:
        super().__init__()
        self.code_size = int(code_size)
        self.weight = nn.Parameter(torch.empty(math.prod(slice_shape), self.code_size))
        self.register_buffer("slice_shape", torch.tensor(slice_shape, dtype=torch.int64))
        self._users: list[CSGConv2d] = []  # the layers whose codes it expands, in attachment order
        self._batch: _SharedBatch | None = None

    def attach(self, layer: CSGConv2d) -> None:
        """Register ``layer`` as a user: its codes join the one batched generation per forward pass."""
        self._users.append(layer)
        self._batch = None

    def slices_for(self, layer: CSGConv2d) -> torch.Tensor:
        """``layer``'s flattened slices, from ONE ``codes @ weight.T`` over every attached layer per forward pass.

        The batch is generated when the first layer of a pass asks and released once every attached layer has
        taken its rows. A layer that asks twice (a new pass, or a layer reused within one), a change of any
        code or of the generator (version counter, storage, dtype, device), of grad mode or of autocast starts
        a new batch, so the result always equals ``self(layer.codes)`` and every pass has its own autograd
        graph (two forwards can be back-propagated separately).
        """
        index = self._users.index(layer)  # modules compare by identity
        key = self._batch_key()
        batch = self._batch
        if (batch is None or batch.key != key or index in batch.taken
                or batch.code_keys[index] != _code_key(layer.codes)):
            codes = [u.codes for u in self._users]
            flat = self(torch.cat(codes) if len(codes) > 1 else codes[0])
            # One split node: its backward concatenates the layers' gradients once (slicing per layer would
            # scatter each one into a zero tensor of the whole batch).
            batch = self._batch = _SharedBatch(key, [_code_key(c) for c in codes],
                                               flat.split([c.shape[0] for c in codes]), set())
        batch.taken.add(index)
        rows = batch.rows[index]
        if len(batch.taken) == len(self._users):
            self._batch = None  # every layer has its rows: a later request belongs to the next pass
        return rows

    def release(self) -> None:
        """Drop the shared batch (parameters were changed in a way version counters cannot see, e.g. ``.data``)."""
        self._batch = None

    def _batch_key(self) -> tuple[Any, ...]:
        """What every layer's rows depend on besides its own codes: grad mode, autocast, the generator."""
        w = self.weight
        dev = w.device.type
        return (torch.is_grad_enabled(), torch.is_autocast_enabled(dev) if dev in ("cpu", "cuda") else False,
                _code_key(w))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The slice shape (S0 filters, S1 channels, kh, kw) this generator produces."""
        return tuple(int(s) for s in self.slice_shape.tolist())  # type: ignore[return-value]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Flattened slices ``codes @ weight.T``: (n, n_c) -> (n, prod(slice_shape))."""
        return F.linear(codes, self.weight)

    def extra_repr(self) -> str:
        return f"slice_shape={_shape_str(self.shape)}, code_size={self.code_size}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001 - torch's signature
        key = prefix + "slice_shape"
        if key in state_dict:
            theirs = tuple(int(s) for s in torch.as_tensor(state_dict[key]).flatten().tolist())
            if theirs != self.shape:
                raise ValueError(
                    f"{key}: the state was saved with CSG slice shape {_shape_str(theirs)}, "
                    f"but this model uses slice shape {_shape_str(self.shape)}"
                )
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == 2 and weight.shape[1] != self.code_size:
            raise ValueError(f"{prefix}weight: the state was saved with CSG code size {weight.shape[1]}, "
                             f"but this model uses code size {self.code_size}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._batch = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the in-flight batch behind (it may be part of an autograd graph)."""
        state = super().__getstate__()
        state["_batch"] = None
        return state


def _code_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What identifies a parameter's current values: in-place changes bump ``_version``, moves change storage."""
    return (t._version, t.data_ptr(), t.dtype, t.requires_grad)


class _SharedBatch:
    """One forward pass's batched generation: the key it was made under, each layer's code key and rows, and
    the layers served (each layer checks only its own codes, so a pass costs O(layers))."""

    __slots__ = ("key", "code_keys", "rows", "taken")

    def __init__(self, key: tuple[Any, ...], code_keys: list[tuple[Any, ...]], rows: tuple[torch.Tensor, ...],
                 taken: set[int]) -> None:
        self.key, self.code_keys, self.rows, self.taken = key, code_keys, rows, taken


def slices_per_layer(out_channels: int, in_channels: int, slice_shape: tuple[int, ...]) -> tuple[int, int]:
    """(filter blocks, channel blocks) = (ceil(out/S0), ceil(in/S1)): partial blocks count as whole slices."""
    return -(-out_channels // slice_shape[0]), -(-in_channels // slice_shape[1])


def assemble(flat: torch.Tensor, out_channels: int, in_channels: int, slice_shape: tuple[int, ...]) -> torch.Tensor:
    """Place generated slices (one row per code, row-major over (filter block, channel block)) into a filter.

    (bo*bi, S0*S1*kh*kw) -> (bo, bi, S0, S1, kh, kw) -> (bo, S0, bi, S1, kh, kw) -> (bo*S0, bi*S1, kh, kw),
    then crop to (out, in, kh, kw).
    """
    s0, s1, kh, kw = slice_shape
    bo, bi = slices_per_layer(out_channels, in_channels, slice_shape)
    full = flat.reshape(bo, bi, s0, s1, kh, kw).permute(0, 2, 1, 3, 4, 5).reshape(bo * s0, bi * s1, kh, kw)
    if bo * s0 != out_channels or bi * s1 != in_channels:
        full = full[:out_channels, :in_channels]
    return full


def infer_slice_shapes(out_channels: int, in_channels: int, n_slices: int, kernel: tuple[int, int],
                       generator_rows: int | None) -> list[tuple[int, int, int, int]]:
    """Slice shapes (S0, S1) with this layer's kernel that give ``n_slices`` codes (and ``generator_rows``)."""
    kh, kw = kernel
    found = []
    limit_o = out_channels if generator_rows is None else generator_rows
    for s0 in range(1, limit_o + 1):
        if generator_rows is not None:
            if generator_rows % (s0 * kh * kw):
                continue
            s1_options = [generator_rows // (s0 * kh * kw)]
        else:
            s1_options = list(range(1, in_channels + 1))
        for s1 in s1_options:
            if math.prod(slices_per_layer(out_channels, in_channels, (s0, s1))) == n_slices:
                found.append((s0, s1, kh, kw))
    return found


class CSGConv2d(nn.Module):
    """A Conv2d whose filters are generated from per-slice code vectors by a shared :class:`SliceGenerator`.

    ``codes`` has shape (ceil(out/S0) * ceil(in/S1), n_c). The generator is held by reference and is NOT a
    submodule (it is registered once, on the model, as ``csg_generator``), so it appears once in
    ``named_parameters()``/``trainable_state()`` however many layers use it.

    Weights are regenerated on every forward in train mode (autograd reaches codes and generator); all layers
    sharing a generator take their slices from one batched matmul per forward pass
    (:meth:`SliceGenerator.slices_for`). In eval mode the generated weight is cached and reused until the
    next train-mode forward, ``invalidate_cache()``
    (called by ``models.load_trainable_state``), ``load_state_dict``, or any in-place change of the codes or
    generator (tracked by their version counters, e.g. an optimizer step), device or dtype. An eval-mode
    forward that needs gradients (grad enabled and codes/generator trainable) regenerates without caching.
    """

    def __init__(self, conv: nn.Conv2d, generator: SliceGenerator) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"CSG needs an ungrouped zero-padded conv, got groups={conv.groups}, "
                             f"padding_mode={conv.padding_mode!r}")
        shape = generator.shape
        if tuple(conv.kernel_size) != shape[2:]:
            raise ValueError(f"conv kernel {tuple(conv.kernel_size)} does not match slice shape {_shape_str(shape)}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation, self.groups = conv.padding, tuple(conv.dilation), conv.groups
        self.padding_mode = conv.padding_mode
        self.__dict__["_generator"] = generator  # a plain reference: not a submodule (see class docstring)
        n = math.prod(slices_per_layer(self.out_channels, self.in_channels, shape))
        ref = conv.weight
        self.codes = nn.Parameter(torch.empty(n, generator.code_size, device=ref.device, dtype=ref.dtype))
        self.bias = None
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
        self._cache: tuple[Any, torch.Tensor] | None = None
        generator.attach(self)

    @property
    def generator(self) -> SliceGenerator:
        """The shared slice generator (owned by the model as ``csg_generator``)."""
        return self.__dict__["_generator"]

    @property
    def slice_shape(self) -> tuple[int, int, int, int]:
        return self.generator.shape

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    def generate(self) -> torch.Tensor:
        """The filter tensor (out, in, kh, kw): this layer's rows of the generator's one batched matmul per pass."""
        flat = self.generator.slices_for(self)
        return assemble(flat, self.out_channels, self.in_channels, self.slice_shape)

    @property
    def weight(self) -> torch.Tensor:
        """The filters used by the next forward (generated; cached in eval mode)."""
        return self._current_weight()

    def _cache_key(self) -> tuple[Any, ...]:
        g, c = self.generator.weight, self.codes
        return (c._version, g._version, c.data_ptr(), g.data_ptr(), c.device, c.dtype, g.dtype)

    def _current_weight(self) -> torch.Tensor:
        if self.training:
            self._cache = None
            return self.generate()
        needs_grad = torch.is_grad_enabled() and (self.codes.requires_grad or self.generator.weight.requires_grad)
        if needs_grad:
            return self.generate()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.generate())
        return self._cache[1]

    def invalidate_cache(self) -> None:
        """Drop the eval-mode cached weight and the generator's shared batch (parameters were changed from outside)."""
        self._cache = None
        self.generator.release()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._current_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_compact(self) -> nn.Conv2d:
        """The plain nn.Conv2d with the generated filters written in, detached, in this layer's train mode."""
        ref = self.codes
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.generate())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.train(self.training)

    def check_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Raise a ValueError naming both slice shapes if ``state`` holds codes from another slice shape."""
        key = prefix + "codes"
        if key not in state:
            return
        theirs = tuple(state[key].shape)
        if theirs == tuple(self.codes.shape):
            return
        mine = f"slice shape {_shape_str(self.slice_shape)} with code size {self.generator.code_size}"
        # A travelling state carries no slice-shape metadata (only parameters and BN statistics): infer it.
        gen_w = _find_suffix(state, "csg_generator.weight")
        rows = None if gen_w is None else int(gen_w.shape[0])
        options = infer_slice_shapes(self.out_channels, self.in_channels, theirs[0], self.kernel_size, rows)
        if len(options) == 1:
            what = f"slice shape {_shape_str(options[0])}"
        elif 1 < len(options) <= 4:
            what = "slice shape one of " + ", ".join(_shape_str(o) for o in options)
        else:
            what = f"a slice shape giving {theirs[0]} slices for this {self.out_channels}x{self.in_channels} conv"
        raise ValueError(
            f"{key}: the state holds codes of shape {_shape_str(theirs)} ({what} with code size "
            f"{theirs[1] if len(theirs) > 1 else '?'}), but this model uses {mine} "
            f"(codes of shape {_shape_str(tuple(self.codes.shape))})"
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, slice_shape={_shape_str(self.slice_shape)}, "
                f"codes={tuple(self.codes.shape)}, bias={self.bias is not None}")


def _find_suffix(state: dict[str, torch.Tensor], suffix: str) -> torch.Tensor | None:
    for k, v in state.items():
        if k == suffix or k.endswith("." + suffix):
            return v
    return None
