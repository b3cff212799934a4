"""The data stage: read, embed, augment and partition CIFAR, and build seeded loaders from a run config.

Rooms: :mod:`~pipeline.data.formats` (official python-format files, restricted unpickler),
:mod:`~pipeline.data.download` (md5-checked fetch), :mod:`~pipeline.data.embedded` (the real CIFAR-10 subset
shipped in ``pipeline/assets/``), :mod:`~pipeline.data.transforms` (batch-vectorised crop/flip/normalise),
:mod:`~pipeline.data.loaders` (datasets, samplers, loaders), :mod:`~pipeline.data.partition` (IID /
Dirichlet / shards), :mod:`~pipeline.data.node_data` (a deployed SuperNode's own folder, written by
``compactfl partition``) and :mod:`~pipeline.data.datasets` (what a run config asks for). Engines call
:func:`train_loader` (local / Ray ranks), :func:`client_train_loader` (Flower partitions), :func:`test_loader`
and :func:`test_shard_loader`; ``pipeline.data`` re-exports what callers need, so it is the one import.
"""

from pipeline.data.datasets import (
    client_partition,
    client_train_loader,
    dataset_for,
    load_cifar,
    load_split,
    partition_table,
    test_loader,
    test_shard_loader,
    train_loader,
)
from pipeline.data.download import download
from pipeline.data.embedded import load_embedded
from pipeline.data.formats import CifarArrays, DataError, safe_unpickle
from pipeline.data.loaders import (
    BatchTransform,
    CifarLoader,
    ImageDataset,
    SeededShuffleSampler,
    make_test_loader,
    make_train_loader,
)
from pipeline.data.partition import format_partition_summary, label_entropy, partition, partition_summary

__all__ = [
    "BatchTransform", "CifarArrays", "CifarLoader", "DataError", "ImageDataset", "SeededShuffleSampler",
    "client_partition", "client_train_loader", "dataset_for", "download", "format_partition_summary",
    "label_entropy", "load_cifar", "load_embedded", "load_split", "make_test_loader", "make_train_loader",
    "partition", "partition_summary", "partition_table", "safe_unpickle", "test_loader", "test_shard_loader",
    "train_loader",
]
