"""Split a training set across federated clients: IID, Dirichlet(alpha) label skew, k-class label shards.

Every partitioner is a pure function of (labels, number of partitions, config, seed) and returns sorted,
disjoint int64 index arrays that together cover every sample, so all clients of one run agree on the split
without talking to each other.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import PartitionConfig
from pipeline.data.formats import DataError

MAX_DIRICHLET_TRIES = 10_000


def partition(labels: np.ndarray, num_partitions: int, partition_cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` into ``num_partitions`` parts as ``partition_cfg`` says."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if num_partitions < 1:
        raise DataError(f"partition: num_partitions must be >= 1, got {num_partitions}")
    if len(labels) < num_partitions:
        raise DataError(f"partition: {len(labels)} samples cannot fill {num_partitions} partitions")
    if num_partitions == 1:  # one client holds everything, whatever the partitioner
        return [np.arange(len(labels), dtype=np.int64)]
    rng = np.random.default_rng(seed)
    if partition_cfg.kind == "iid":
        return iid(len(labels), num_partitions, rng)
    if partition_cfg.kind == "dirichlet":
        return dirichlet(labels, num_partitions, partition_cfg.alpha, partition_cfg.min_size, rng)
    if partition_cfg.kind == "shards":
        return shards(labels, num_partitions, partition_cfg.classes_per_client, rng)
    raise DataError(f"data.partition.kind: unknown partitioner {partition_cfg.kind!r}")


def iid(n: int, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniform random split into parts whose sizes differ by at most one."""
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_partitions)]


def _dirichlet_counts(class_sizes: np.ndarray, num_partitions: int, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
    """(partitions, classes) counts: each class's samples spread by proportions drawn from Dir(alpha)."""
    props = rng.dirichlet(np.full(num_partitions, alpha), size=len(class_sizes))  # (C, P)
    cuts = np.floor(np.cumsum(props, axis=1) * class_sizes[:, None]).astype(np.int64)
    cuts[:, -1] = class_sizes
    return np.diff(cuts, axis=1, prepend=0).T


def dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, min_size: int,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: class c's samples go to clients in proportions ~ Dir(alpha); redraw until every part
    holds at least ``min_size`` samples (at most ``MAX_DIRICHLET_TRIES`` draws, then a clear error)."""
    if alpha <= 0:
        raise DataError(f"data.partition.alpha must be > 0, got {alpha}")
    n = len(labels)
    if num_partitions * min_size > n:
        raise DataError(f"data.partition.min_size={min_size} x {num_partitions} partitions exceeds the {n} samples")
    classes = np.unique(labels)
    class_sizes = np.array([(labels == c).sum() for c in classes], dtype=np.int64)
    for _ in range(MAX_DIRICHLET_TRIES):
        counts = _dirichlet_counts(class_sizes, num_partitions, alpha, rng)  # (P, C)
        if counts.sum(axis=1).min() >= min_size:
            break
    else:
        raise DataError(f"data.partition: no Dirichlet(alpha={alpha}) split of {n} samples gave all "
                        f"{num_partitions} partitions >= min_size={min_size} in {MAX_DIRICHLET_TRIES} draws; "
                        "raise alpha or lower min_size")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for j, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for p, chunk in enumerate(np.split(idx, np.cumsum(counts[:, j])[:-1])):
            parts[p].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def shards(labels: np.ndarray, num_partitions: int, classes_per_client: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological label shards: every client holds exactly ``classes_per_client`` distinct classes.

    Classes are dealt cyclically over a seeded class permutation (client i gets positions i*k .. i*k+k-1
    mod C), so each class goes to ceil or floor of P*k/C clients and its samples are split evenly among them.
    """
    classes = np.unique(labels)
    k, c = classes_per_client, len(classes)
    if k > c:
        raise DataError(f"data.partition.classes_per_client={k} exceeds the {c} classes present")
    if num_partitions * k < c:
        raise DataError(f"data.partition: {num_partitions} clients x classes_per_client={k} cover only "
                        f"{num_partitions * k} of {c} classes (need clients * classes_per_client >= {c})")
    order = classes[rng.permutation(c)]
    owners: dict[int, list[int]] = {int(cl): [] for cl in classes}
    for client in range(num_partitions):
        for j in range(k):
            owners[int(order[(client * k + j) % c])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cl, holders in owners.items():
        idx = rng.permutation(np.flatnonzero(labels == cl))
        if len(idx) < len(holders):
            raise DataError(f"data.partition: class {cl} has {len(idx)} samples for {len(holders)} shard holders")
        for client, chunk in zip(holders, np.array_split(idx, len(holders)), strict=True):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def partition_summary(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts per client per class: int64 array (num_partitions, num_classes)."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]) if parts else \
        np.zeros((0, num_classes), dtype=np.int64)


def label_entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each client's label distribution; lower means more skewed."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=1)


def format_partition_summary(counts: np.ndarray, class_names: list[str] | None = None) -> str:
    """A markdown table of ``partition_summary`` counts (rows: clients; columns: classes, total, entropy)."""
    counts = np.asarray(counts)
    names = list(class_names) if class_names else [str(i) for i in range(counts.shape[1])]
    head = "| client | " + " | ".join(names) + " | total | entropy (bits) |"
    rule = "|" + "---|" * (len(names) + 3)
    ent = label_entropy(counts)
    rows = [f"| {i} | " + " | ".join(str(int(v)) for v in row) + f" | {int(row.sum())} | {ent[i]:.2f} |"
            for i, row in enumerate(counts)]
    return "\n".join([head, rule, *rows])
