"""The embedded default data: a real CIFAR-10 subset shipped as JPEG bytes in ``pipeline/assets/``.

``cifar10_subset.npz`` (made by ``python -m pipeline.data.make_embedded``) holds 500 train + 100 test images per
class as the original JPEG files of the shared CIFAR-10 copy. It is a demo/test subset, not the full data
set. Decoding takes a fraction of a second and is cached per process (Flower re-creates ClientApps per
message; the pixels are decoded once).
"""

from __future__ import annotations

import functools
import io
import json
import os
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.formats import CIFAR10_CLASSES, CifarArrays, DataError

ASSET_NAME = "cifar10_subset.npz"
ASSET = Path(__file__).resolve().parents[1] / "assets" / ASSET_NAME
ASSET_ENV = "COMPACTFL_EMBEDDED_DATA"


def find_asset() -> Path:
    """Where the embedded subset lies: beside this module, else ``$COMPACTFL_EMBEDDED_DATA``, else the
    installed ``compactfl`` distribution (``flwr run`` ships only .py/.toml/.yaml/.json/.md files of the app,
    so a Flower App Bundle carries the code without this binary asset)."""
    candidates = [ASSET]
    if os.environ.get(ASSET_ENV):
        candidates.append(Path(os.environ[ASSET_ENV]))
    try:
        dist = metadata.distribution("compactfl")
        candidates.append(Path(str(dist.locate_file(f"pipeline/assets/{ASSET_NAME}"))))
        direct = dist.read_text("direct_url.json")  # editable installs point at the source checkout
        if direct:
            url = json.loads(direct).get("url", "")
            if url.startswith("file://"):
                candidates.append(Path(url[len("file://"):]) / "pipeline" / "assets" / ASSET_NAME)
    except metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    return ASSET
_KEYS = ("jpeg", "offsets", "labels", "train")


@functools.lru_cache(maxsize=2)
def _decoded(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 NHWC, labels int64, train mask) of the whole asset, decoded once per process."""
    if not path.is_file():
        raise DataError(f"{path}: embedded CIFAR-10 subset missing (regenerate: python -m pipeline.data.make_embedded)")
    try:
        with np.load(path, allow_pickle=False) as z:
            jpeg, offsets, labels, train = (z[k] for k in _KEYS)
    except Exception as exc:  # noqa: BLE001 - any read failure means a broken asset
        raise DataError(f"{path}: unreadable embedded subset ({type(exc).__name__}: {exc})") from None
    n = len(labels)
    if offsets.shape != (n + 1,) or train.shape != (n,) or offsets[-1] != len(jpeg):
        raise DataError(f"{path}: inconsistent embedded subset (offsets/labels/train lengths disagree)")
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as im:
            images[i] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    labels = labels.astype(np.int64)
    for a in (images, labels, train):
        a.flags.writeable = False
    return images, labels, train


def load_embedded(split: str, path: Path | None = None) -> CifarArrays:
    """The ``train`` or ``test`` split of the embedded CIFAR-10 subset (decoded with Pillow, cached)."""
    if split not in ("train", "test"):
        raise DataError(f"split: expected 'train' or 'test', got {split!r}")
    images, labels, train = _decoded(Path(path) if path is not None else find_asset())
    mask = train if split == "train" else ~train
    return CifarArrays(images[mask], labels[mask], 10, list(CIFAR10_CLASSES), "cifar10")
