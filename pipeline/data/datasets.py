"""Splits, datasets, partitions and the seeded loaders of a run config (cached per process).

Decoded splits, datasets and partitions are cached per process, so Flower ClientApps (re-created per
message) and Ray workers pay for loading once.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from pipeline.config import DataConfig, PartitionConfig, RunConfig
from pipeline.data.embedded import load_embedded
from pipeline.data.formats import CifarArrays, DataError, read_split
from pipeline.data.loaders import CifarLoader, ImageDataset, make_test_loader, make_train_loader
from pipeline.data.node_data import is_node_folder, load_node_data
from pipeline.data.partition import format_partition_summary, partition, partition_summary
from pipeline.data.transforms import hash_seed


@functools.lru_cache(maxsize=4)
def _load_cifar_cached(name: str, root: Path, split: str) -> CifarArrays:
    arrays = read_split(name, root, split)
    arrays.images.flags.writeable = False
    arrays.labels.flags.writeable = False
    return arrays


def load_cifar(name: str, root: Path | str, split: str) -> CifarArrays:
    """``split`` of ``name`` (cifar10/cifar100) from the official folder under ``root`` (validated, cached)."""
    return _load_cifar_cached(name, Path(root).expanduser().resolve(), split)


def _limit(data_cfg: DataConfig, split: str) -> int | None:
    return data_cfg.train_limit if split == "train" else data_cfg.test_limit


def load_split(data_cfg: DataConfig, split: str) -> CifarArrays:
    """The ``train``/``test`` split the config asks for: ``root`` or the embedded subset, then the limit."""
    arrays = load_embedded(split) if data_cfg.root is None else load_cifar(data_cfg.name, data_cfg.root, split)
    limit = _limit(data_cfg, split)
    return arrays if limit is None or limit >= len(arrays) else arrays.take(slice(0, limit))


def _key(data_cfg: DataConfig, split: str) -> tuple:
    root = None if data_cfg.root is None else str(Path(data_cfg.root).expanduser().resolve())
    return data_cfg.name, root, split, _limit(data_cfg, split)


@functools.lru_cache(maxsize=4)
def _dataset_cached(key: tuple) -> ImageDataset:
    name, root, split, limit = key
    cfg = DataConfig(name=name, root=root, train_limit=limit if split == "train" else None,
                     test_limit=limit if split == "test" else None)
    return ImageDataset.from_arrays(load_split(cfg, split))


def dataset_for(data_cfg: DataConfig, split: str) -> ImageDataset:
    """The (cached) :class:`ImageDataset` of a split, shared by every loader of this process."""
    return _dataset_cached(_key(data_cfg, split))


@functools.lru_cache(maxsize=8)
def _partitions_cached(key: tuple, partition_json: str, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    labels = _dataset_cached(key).labels.numpy()
    cfg = PartitionConfig.model_validate_json(partition_json)
    parts = tuple(partition(labels, num_partitions, cfg, seed))
    for p in parts:
        p.flags.writeable = False
    return parts


def client_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """Training-set indices of client ``partition_id`` of ``num_partitions`` (same split in every process)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition_id {partition_id} is outside 0..{num_partitions - 1}")
    parts = _partitions_cached(_key(cfg.data, "train"), cfg.data.partition.model_dump_json(), num_partitions,
                               cfg.seed)
    return parts[partition_id]


def partition_table(cfg: RunConfig, num_partitions: int) -> str:
    """A markdown table of each client's class counts and label entropy (how skewed the split is)."""
    parts = _partitions_cached(_key(cfg.data, "train"), cfg.data.partition.model_dump_json(), num_partitions,
                               cfg.seed)
    labels = _dataset_cached(_key(cfg.data, "train")).labels.numpy()
    return format_partition_summary(partition_summary(labels, list(parts), cfg.data.num_classes))


def client_train_loader(cfg: RunConfig, partition_id: int, num_partitions: int) -> CifarLoader:
    """Loader over one client's partition (``cfg.data.partition``, seeded by ``cfg.seed``).

    Shuffling/augmentation are seeded per client; call ``loader.set_epoch(e)`` with a global epoch count
    (e.g. ``(round - 1) * local_epochs + local_epoch``) so rounds do not repeat the same order.
    """
    if is_node_folder(cfg.data.root):  # a deployed SuperNode: its own folder holds exactly its partition
        node = load_node_data(cfg.data.root, partition_id, num_partitions, cfg.data.name)
        return make_train_loader(node.train, cfg.train.batch_size, seed=hash_seed(cfg.seed, partition_id),
                                 augment=cfg.data.augment)
    idx = client_partition(cfg, partition_id, num_partitions)
    return make_train_loader(dataset_for(cfg.data, "train"), cfg.train.batch_size,
                             seed=hash_seed(cfg.seed, partition_id), augment=cfg.data.augment, indices=idx)


def train_loader(cfg: RunConfig, *, rank: int = 0, world_size: int = 1) -> CifarLoader:
    """The whole training split for local training, or rank ``rank``'s shard under DistributedSampler."""
    ds = dataset_for(cfg.data, "train")
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    return make_train_loader(ds, cfg.train.batch_size, seed=hash_seed(cfg.seed, rank), augment=cfg.data.augment,
                             sampler=sampler)


def test_loader(cfg: RunConfig) -> CifarLoader:
    """The test split in fixed order, batched by ``cfg.train.eval_batch_size``."""
    return make_test_loader(dataset_for(cfg.data, "test"), cfg.train.eval_batch_size)


test_loader.__test__ = False  # type: ignore[attr-defined]  # keep pytest from collecting it when imported


def test_shard_loader(cfg: RunConfig, shard: int, num_shards: int) -> CifarLoader:
    """Every ``num_shards``-th test sample from ``shard`` on (the shards cover the test set exactly once)."""
    if is_node_folder(cfg.data.root):  # a deployed SuperNode holds its shard only
        node = load_node_data(cfg.data.root, shard, num_shards, cfg.data.name)
        return make_test_loader(node.test, cfg.train.eval_batch_size)
    test_set = dataset_for(cfg.data, "test")
    return make_test_loader(test_set.subset(torch.arange(shard, len(test_set), num_shards)), cfg.train.eval_batch_size)


test_shard_loader.__test__ = False  # type: ignore[attr-defined]
