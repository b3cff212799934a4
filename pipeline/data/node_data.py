"""Per-node data folders for a real Flower deployment: write each SuperNode's partition, read one back.

``write_node_partitions(cfg, out)`` writes ``out/node-<i>/`` for every client ``i`` of ``cfg.engine.clients``:
``data.npz`` (``train_images``/``train_labels``: exactly the samples :func:`pipeline.data.client_partition`
gives client ``i`` in simulation, in the same order; ``test_images``/``test_labels``: the test shard
:func:`pipeline.data.test_shard_loader` gives it) and ``partition.json`` (dataset, partition id and count,
the split settings, the sha256 of ``data.npz``). So a simulation and a deployment of one config train on the
same samples. ``data.npz`` is read with ``allow_pickle=False``: object arrays are refused, nothing in the
file runs. A folder that is missing, altered or meant for another node is a one-line :class:`DataError`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig
from pipeline.data.formats import CifarArrays, DataError

MANIFEST = "partition.json"
ARRAYS = "data.npz"
FORMAT = "compactfl-node-partition/1"
KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def node_folder(out: Path | str, partition_id: int) -> Path:
    """Where node ``partition_id``'s data goes under ``out``."""
    return Path(out) / f"node-{partition_id}"


def is_node_folder(path: Path | str | None) -> bool:
    """True when ``path`` holds a node partition (a ``partition.json``), not the official CIFAR layout."""
    return path is not None and (Path(path).expanduser() / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_node_partitions(cfg: RunConfig, out: Path | str) -> list[Path]:
    """Write every client's training partition and test shard to ``out/node-<i>/``; returns the folders."""
    from pipeline.data.datasets import client_partition, load_split

    if cfg.engine.kind != "flower":
        raise DataError(f"partition: engine.kind must be 'flower' (it sets engine.clients), got {cfg.engine.kind!r}")
    n = cfg.engine.clients
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    folders = []
    for i in range(n):
        folder = node_folder(out, i)
        folder.mkdir(parents=True, exist_ok=True)
        idx = client_partition(cfg, i, n)
        shard = np.arange(i, len(test), n)
        np.savez(folder / ARRAYS, train_images=train.images[idx], train_labels=train.labels[idx],
                 test_images=test.images[shard], test_labels=test.labels[shard])
        manifest = {"format": FORMAT, "dataset": cfg.data.name, "num_classes": cfg.data.num_classes,
                    "class_names": list(train.class_names), "partition_id": i, "num_partitions": n,
                    "partition": cfg.data.partition.model_dump(mode="json"), "seed": cfg.seed,
                    "train_samples": len(idx), "test_samples": len(shard), "sha256": _sha256(folder / ARRAYS)}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        folders.append(folder)
    return folders


@dataclass(frozen=True)
class NodeData:
    """One node's own data: its training partition and its test shard, checked against its manifest."""

    folder: Path
    manifest: dict
    train: CifarArrays
    test: CifarArrays

    def check_node(self, partition_id: int, num_partitions: int, dataset: str | None = None) -> None:
        """Refuse a folder written for another node (partition id or count) or another data set."""
        got = (self.manifest.get("partition_id"), self.manifest.get("num_partitions"))
        if got != (partition_id, num_partitions):
            raise DataError(f"{self.folder}: holds partition {got[0]} of {got[1]}, but this node is partition "
                            f"{partition_id} of {num_partitions} (node config partition-id/num-partitions)")
        if dataset is not None and self.manifest.get("dataset") != dataset:
            raise DataError(f"{self.folder}: holds {self.manifest.get('dataset')} data, the run trains on {dataset}")


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder}: no {MANIFEST}; write node folders with: compactfl partition CONFIG --out DIR")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a compactfl node partition (expected format {FORMAT!r})")
    return manifest


def _read_arrays(folder: Path, manifest: dict) -> dict[str, np.ndarray]:
    path = folder / ARRAYS
    if not path.is_file():
        raise DataError(f"{path}: missing; write node folders with: compactfl partition CONFIG --out DIR")
    if _sha256(path) != manifest.get("sha256"):
        raise DataError(f"{path}: sha256 differs from {MANIFEST} (altered or truncated); write it again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: lacks array {missing[0]!r}")
            return {k: npz[k] for k in KEYS}
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/npy parse errors, object arrays refused without pickle
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def _arrays(arrays: dict[str, np.ndarray], split: str, manifest: dict, path: Path) -> CifarArrays:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {split}_labels must be integers, got {labels.dtype}")
    try:
        return CifarArrays(images, labels, int(manifest["num_classes"]), list(manifest.get("class_names", [])),
                           manifest.get("dataset"))
    except (DataError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: {split} split: {exc}") from None


@functools.lru_cache(maxsize=2)
def _load_cached(folder: Path, _stamp: tuple) -> NodeData:
    manifest = _read_manifest(folder)
    arrays = _read_arrays(folder, manifest)
    train, test = (_arrays(arrays, s, manifest, folder / ARRAYS) for s in ("train", "test"))
    for a in (train, test):
        a.images.flags.writeable = False
    return NodeData(folder, manifest, train, test)


def load_node_data(folder: Path | str, partition_id: int, num_partitions: int, dataset: str | None = None) -> NodeData:
    """This node's data from its own folder (cached per process); one-line DataError when it is not usable
    (missing, altered, another node's, or another ``dataset``'s)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"node data folder {str(folder)!r} does not exist")
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                  for p in (folder / MANIFEST, folder / ARRAYS))  # a rewritten folder is read again
    data = _load_cached(folder, stamp)
    data.check_node(partition_id, num_partitions, dataset)
    return data
