"""Batch image transforms as torch tensor ops (no torchvision): normalisation, padded random crop, flip.

Everything works on a whole batch at once: the crop and the flip of all images are one gather driven by
per-image offsets, so an epoch of CIFAR costs a few hundred vectorised ops, not 50k Python calls. Random
draws come from an explicit ``torch.Generator`` so a seed fixes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Per-channel statistics of the training sets (RGB, pixels scaled to [0, 1]).
STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed (small, memory-bound) batch ops on one intra-op thread.

    On busy cores, OpenMP fan-out for a 128-image batch costs far more than it saves: an augmented CIFAR-10
    epoch measured 30-40 s with 2 threads vs 2-3 s with 1 thread under load (benchmarks/data_loading.py).
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def stats_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of data set ``name``; unknown names raise ValueError."""
    if name not in STATS:
        raise ValueError(f"no normalisation statistics for data set {name!r} (known: {sorted(STATS)})")
    return STATS[name]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) pixels in 0..255 -> float32 ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    scale, shift = 1.0 / (255.0 * s), -m / s
    return torch.addcmul(shift, images.to(torch.float32), scale)


def crop_flip(images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, pad: int,
              fill: tuple[float, ...] | None = None) -> torch.Tensor:
    """Pad by ``pad`` (zeros, or per-channel ``fill``), crop each image at (oy, ox) of the padded image and
    mirror it where ``flip``.

    ``oy``/``ox`` are int64 (B,) offsets in ``[0, 2 * pad]``; ``flip`` is bool (B,). One gather does it all.
    ``fill`` lets already-normalised images pad with normalised black (``-mean / std``).
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    if pad and fill is not None:
        border = torch.ones(1, 1, h + 2 * pad, w + 2 * pad, dtype=torch.bool)
        border[..., pad:pad + h, pad:pad + w] = False
        fills = torch.tensor(fill, dtype=images.dtype).view(1, c, 1, 1)
        padded = torch.where(border, fills, padded)
    pw = w + 2 * pad
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flip.view(b, 1), w - 1 - cols, cols) + ox.view(b, 1)
    rows = torch.arange(h).view(1, h) + oy.view(b, 1)
    flat = (rows.view(b, h, 1) * pw + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded.reshape(b, c, -1), 2, flat).view(b, c, h, w)


def sample_crop_flip(batch: int, pad: int, generator: torch.Generator | None,
                     flip_p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (oy, ox, flip) for ``batch`` images: offsets uniform in ``[0, 2 * pad]``, flips with ``flip_p``."""
    oy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < flip_p
    return oy, ox, flip


def random_crop_flip(images: torch.Tensor, generator: torch.Generator | None, pad: int = 4,
                     flip_p: float = 0.5, fill: tuple[float, ...] | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch: random crop with ``pad``-pixel zero padding + horizontal flip."""
    oy, ox, flip = sample_crop_flip(images.shape[0], pad, generator, flip_p)
    return crop_flip(images, oy, ox, flip, pad, fill)


def random_crop(images: torch.Tensor, generator: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding only (no flip)."""
    return random_crop_flip(images, generator, pad, flip_p=0.0)


def random_hflip(images: torch.Tensor, generator: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = torch.rand(images.shape[0], generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def normalized_black(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[float, ...]:
    """What a zero pixel becomes after :func:`normalize` (the padding value for normalised images)."""
    return tuple(-m / s for m, s in zip(mean, std, strict=True))


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator seeded from (seed, epoch, stream): reproducible, different per epoch and per stream."""
    g = torch.Generator()
    g.manual_seed(hash_seed(seed, epoch, stream))
    return g


def hash_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (SplitMix64 steps), so nearby inputs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for p in parts:
        x = (x ^ (int(p) & mask)) * 0xBF58476D1CE4E5B9 & mask
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & mask
        x ^= x >> 29
    return x & ((1 << 63) - 1)
