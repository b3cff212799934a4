"""Read CIFAR-10/100 from their official python-format folders with a restricted unpickler.

The official files are pickles. A plain ``pickle.load`` would run whatever a tampered file asks for, so
:class:`SafeUnpickler` admits only what these files need: builtin containers and scalars (no globals at all)
plus numpy array reconstruction and a latin-1-only ``_codecs.encode`` (how Python 3 pickles ``bytes`` at
protocol 2). Anything else raises :class:`DataError` naming the file and the refused global, before it runs.
"""

from __future__ import annotations

import codecs
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta"},
    "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta"},
}
LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
NAME_KEYS = {"cifar10": "label_names", "cifar100": "fine_label_names"}
IMAGE_BYTES = 32 * 32 * 3


class DataError(ValueError):
    """A data set that is missing, corrupt, unsafe or inconsistent (message: one line naming the file)."""


def how_to_get(name: str, root: Path | str) -> str:
    """The one-line hint telling a user how to obtain ``name`` under ``root``."""
    hint = f"get it with pipeline.data.download({name!r}, {str(root)!r})"
    if name == "cifar10":
        hint += f" or python ../shared/data/cifar10.py {root}"
    return hint


@dataclass
class CifarArrays:
    """One split in memory: ``images`` uint8 (N, 32, 32, 3) NHWC, ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[1:] != (32, 32, 3):
            raise DataError(f"CifarArrays.images must be uint8 (N, 32, 32, 3), got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise DataError(f"CifarArrays.labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}")
        self.labels = self.labels.astype(np.int64, copy=False)
        check_labels(self.labels, self.num_classes, "CifarArrays.labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dataset_name(self) -> str:
        """``cifar10`` or ``cifar100`` (picks the normalisation statistics)."""
        return self.name or ("cifar100" if self.num_classes == 100 else "cifar10")

    def take(self, indices: np.ndarray | slice) -> CifarArrays:
        """A new CifarArrays holding the selected samples (same classes)."""
        return CifarArrays(self.images[indices], self.labels[indices], self.num_classes, list(self.class_names),
                           self.name)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise DataError unless every label lies in ``[0, num_classes)``."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")


# ------------------------------------------------------------------------------------------ unpickling
def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it, restricted to latin-1."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode only allowed as (str, 'latin1'), got encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


_ALLOWED: dict[tuple[str, str], Any] = {
    **_numpy_globals(),
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED`` (numpy arrays, builtin containers)."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)  # Python 2 / protocol-2 spelling
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refused to unpickle global {module}.{name} (only builtin containers and "
                            "numpy arrays are allowed; the file may be malicious)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.path}: refused persistent id in pickle (not a CIFAR file)")


def safe_unpickle(path: Path, name: str = "cifar10", root: Path | None = None) -> Any:
    """Load one pickle file with :class:`SafeUnpickler`; any failure is a one-line DataError naming the file."""
    hint = how_to_get(name, root if root is not None else path.parent.parent)
    if not path.is_file():
        raise DataError(f"{path}: missing; {hint}")
    try:
        with path.open("rb") as f:
            return SafeUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure means a corrupt/truncated file
        raise DataError(f"{path}: corrupt or truncated ({type(exc).__name__}: {exc}); {hint}") from None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _as_str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def _read_batch(path: Path, name: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 NHWC, labels int64), with shapes and dtypes validated."""
    d = _as_str_keys(safe_unpickle(path, name, root), path)
    key = LABEL_KEYS[name]
    if "data" not in d or key not in d:
        raise DataError(f"{path}: missing key {'data' if 'data' not in d else key!r} (not a {name} batch file)")
    data, labels = d["data"], d[key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 N x {IMAGE_BYTES}, got {got}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or not all(
        isinstance(v, (int, np.integer)) for v in labels
    ):
        raise DataError(f"{path}: {key!r} must be a list of integers")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    check_labels(labels, NUM_CLASSES[name], str(path))
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_class_names(name: str, root: Path) -> list[str]:
    """Class names from the folder's meta file (validated: one per class)."""
    path = Path(root) / FOLDERS[name] / SPLIT_FILES[name]["meta"]
    meta = _as_str_keys(safe_unpickle(path, name, root), path)
    names = meta.get(NAME_KEYS[name])
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES[name]:
        raise DataError(f"{path}: {NAME_KEYS[name]!r} must list {NUM_CLASSES[name]} class names")
    return [_text(n) for n in names]


def read_split(name: str, root: Path | str, split: str) -> CifarArrays:
    """Read ``split`` (train/test) of ``name`` (cifar10/cifar100) from ``root/<official folder>/``."""
    if name not in FOLDERS:
        raise DataError(f"data.name: unknown data set {name!r} (expected one of {sorted(FOLDERS)})")
    if split not in ("train", "test"):
        raise DataError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(root)
    folder = root / FOLDERS[name]
    if not folder.is_dir():
        raise DataError(f"{folder}: missing {name} folder; {how_to_get(name, root)}")
    parts = [_read_batch(folder / f, name, root) for f in SPLIT_FILES[name][split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(labels) == 0:
        raise DataError(f"{folder}: the {split} split is empty")
    return CifarArrays(images, labels, NUM_CLASSES[name], read_class_names(name, root), name)
