"""Data-layer cost next to training cost: is loading + augmenting an epoch negligible?

    python benchmarks/data_loading.py                         # data/cifar10 if present, else the embedded subset
    python benchmarks/data_loading.py --root data/cifar10 --models smallnet7 resnet20 --train-batches 20

Measures, in one run: reading the official python-format folder (restricted unpickler), decoding the
embedded JPEG subset, one epoch of the vectorised batch loader (crop + flip + normalise, batch 128), the same
epoch through a per-sample Python baseline (torchvision-style: pad/crop/flip per image, default collate), and
the training time of an epoch (forward + backward + SGD, extrapolated from ``--train-batches`` batches) for
each model; prints the ratios loader / baseline and loader / training.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import models
from pipeline.config import DataConfig
from pipeline.data import ImageDataset, load_split, make_train_loader
from pipeline.data.embedded import ASSET, _decoded
from pipeline.data.transforms import normalize, stats_for


class PerSampleBaseline(Dataset):
    """What a per-image pipeline does: pad, random crop, random flip and normalise one image per call."""

    def __init__(self, ds: ImageDataset) -> None:
        self.ds = ds
        self.mean, self.std = stats_for(ds.name)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = F.pad(self.ds.base_images[i], (4, 4, 4, 4))
        oy, ox = torch.randint(0, 9, (2,)).tolist()
        img = img[:, oy:oy + 32, ox:ox + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return normalize(img[None], self.mean, self.std)[0], self.ds.base_labels[i]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def epoch_seconds(loader) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for _, y in loader:
        n += len(y)
    return time.perf_counter() - start, n


def train_epoch_seconds(name: str, batch: int, batches: int, n: int, num_classes: int) -> float:
    """Seconds per epoch of ``n`` samples for model ``name`` (SGD steps timed on random batches)."""
    model = models.build(name, num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, num_classes, (batch,))
    for step in range(batches + 2):
        if step == 2:  # two warm-up steps
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / batches * (n / batch)


def main(argv: list[str] | None = None) -> None:
    """Run the measurements and print one table plus ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("data/cifar10"))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--models", nargs="*", default=["smallnet7", "resnet20"])
    ap.add_argument("--train-batches", type=int, default=10)
    ap.add_argument("--baseline-samples", type=int, default=10_000, help="per-sample baseline: samples timed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    _decoded.cache_clear()
    t_embedded, _ = timed(lambda: _decoded(ASSET))
    print(f"embedded subset decode (6000 JPEGs): {t_embedded:.2f} s")
    root = args.root if (args.root / "cifar-10-batches-py").is_dir() else None
    cfg = DataConfig(root=root)
    t_read, arrays = timed(lambda: load_split(cfg, "train"))
    t_tensor, ds = timed(lambda: ImageDataset.from_arrays(arrays))
    print(f"train split: {len(ds)} images from {root or 'embedded subset'}: read {t_read:.2f} s, "
          f"to tensor {t_tensor:.2f} s, pixels {ds.base_images.numel() / 2**20:.0f} MiB (uint8)")

    loader = make_train_loader(ds, args.batch_size, seed=0, augment=True)
    t_epoch, n = epoch_seconds(loader)
    print(f"vectorised loader, one augmented epoch: {t_epoch:.2f} s ({n / t_epoch:,.0f} images/s)")

    m = min(args.baseline_samples, len(ds))
    base = DataLoader(PerSampleBaseline(ds.subset(torch.arange(m))), batch_size=args.batch_size, shuffle=True)
    t_base_part, _ = epoch_seconds(base)
    t_base = t_base_part * len(ds) / m
    print(f"per-sample baseline, one epoch (extrapolated from {m}): {t_base:.2f} s ({len(ds) / t_base:,.0f} images/s)"
          f"  -> vectorised is {t_base / t_epoch:.1f}x faster")

    for name in args.models:
        t_train = train_epoch_seconds(name, args.batch_size, args.train_batches, len(ds), ds.num_classes)
        print(f"{name}: training epoch ~{t_train:.1f} s; data loading = {100 * t_epoch / t_train:.1f}% of it")


if __name__ == "__main__":
    main()
