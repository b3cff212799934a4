"""Regenerate the embedded CIFAR-10 subset ``pipeline/assets/cifar10_subset.npz`` (deterministic, byte-exact).

    python -m pipeline.data.make_embedded                      # 500 train + 100 test images per class
    python -m pipeline.data.make_embedded --source ../shared/data/cifar10-jpeg.npz --out /tmp/x.npz

It copies the ORIGINAL JPEG bytes of the first N train / M test images of each class from the shared
``cifar10-jpeg.npz`` (no re-encoding), puts each split in a fixed shuffled order (seed 0, so
``data.train_limit`` still gives balanced classes) and writes a compressed, pickle-free ``.npz`` with fixed
zip timestamps, so the same source always yields the same bytes.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cifar10-jpeg.npz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "cifar10_subset.npz"


def select(labels: np.ndarray, train: np.ndarray, per_class_train: int, per_class_test: int,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Source indices of the subset (train first, then test), each split in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    out = []
    for mask, per_class in ((train, per_class_train), (~train, per_class_test)):
        idx = np.concatenate([np.flatnonzero(mask & (labels == c))[:per_class] for c in range(10)])
        out.append(idx[rng.permutation(len(idx))])
    return out[0], out[1]


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps (byte-reproducible; loads with allow_pickle=False)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def build(source: Path, out: Path, per_class_train: int = 500, per_class_test: int = 100) -> dict[str, int]:
    """Write the subset asset from ``source``; returns counts and the file size."""
    with np.load(source, allow_pickle=False) as src:
        jpeg, offsets, labels, train = src["jpeg"], src["offsets"], src["labels"], src["train"]
    tr, te = select(labels, train, per_class_train, per_class_test)
    chosen = np.concatenate([tr, te])
    blobs = [jpeg[offsets[i]:offsets[i + 1]] for i in chosen]
    new_offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    write_npz(out, {
        "jpeg": np.concatenate(blobs).astype(np.uint8),
        "offsets": new_offsets,
        "labels": labels[chosen].astype(np.uint8),
        "train": np.concatenate([np.ones(len(tr), bool), np.zeros(len(te), bool)]),
        "source_index": chosen.astype(np.int64),
    })
    return {"train": len(tr), "test": len(te), "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: build the asset and print what was written."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--per-class-train", type=int, default=500)
    ap.add_argument("--per-class-test", type=int, default=100)
    args = ap.parse_args(argv)
    info = build(args.source, args.out, args.per_class_train, args.per_class_test)
    print(f"wrote {info['train']} train + {info['test']} test JPEGs ({info['bytes'] / 1e6:.2f} MB) to {args.out}")


if __name__ == "__main__":
    main()
