"""Partitioners: disjoint, complete, seeded; Dirichlet skew grows as alpha falls; shards give k classes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import PartitionConfig
from pipeline.data import DataError, format_partition_summary, label_entropy, partition, partition_summary

LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 300))  # 3000 balanced samples


def _check_disjoint_complete(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint + complete
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


CONFIGS = [
    PartitionConfig(kind="iid"),
    PartitionConfig(kind="dirichlet", alpha=0.3, min_size=20),
    PartitionConfig(kind="shards", classes_per_client=3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.kind)
def test_disjoint_complete_and_seeded(cfg: PartitionConfig) -> None:
    parts = partition(LABELS, 7, cfg, seed=3)
    assert len(parts) == 7
    _check_disjoint_complete(parts, len(LABELS))
    again = partition(LABELS, 7, cfg, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(LABELS, 7, cfg, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_and_balance() -> None:
    parts = partition(LABELS, 7, PartitionConfig(kind="iid"), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_entropy(partition_summary(LABELS, parts, 10)).min() > 3.2  # near log2(10) = 3.32


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    entropy = {}
    for alpha in (100.0, 1.0, 0.1):
        cfg = PartitionConfig(kind="dirichlet", alpha=alpha, min_size=10)
        per_seed = [label_entropy(partition_summary(LABELS, partition(LABELS, 10, cfg, seed=s), 10)).mean()
                    for s in range(3)]
        entropy[alpha] = float(np.mean(per_seed))
    assert entropy[100.0] > 3.2 > entropy[1.0] + 0.3 and entropy[1.0] > entropy[0.1] + 0.5, entropy


def test_dirichlet_min_size_respected_and_errors() -> None:
    cfg = PartitionConfig(kind="dirichlet", alpha=0.05, min_size=100)
    parts = partition(LABELS, 10, cfg, seed=1)
    assert min(len(p) for p in parts) >= 100
    _check_disjoint_complete(parts, len(LABELS))
    with pytest.raises(DataError, match=r"min_size=400 x 10 partitions exceeds the 3000 samples"):
        partition(LABELS, 10, PartitionConfig(kind="dirichlet", min_size=400), seed=0)
    with pytest.raises(DataError, match=r"no Dirichlet\(alpha=0.001\) split .* min_size=310 in 10000 draws"):
        partition(LABELS, 9, PartitionConfig(kind="dirichlet", alpha=0.001, min_size=310), seed=0)


@pytest.mark.parametrize("clients,k", [(5, 2), (7, 3), (4, 10), (20, 1)])
def test_shards_give_k_classes_per_client(clients: int, k: int) -> None:
    parts = partition(LABELS, clients, PartitionConfig(kind="shards", classes_per_client=k), seed=2)
    _check_disjoint_complete(parts, len(LABELS))
    counts = partition_summary(LABELS, parts, 10)
    assert ((counts > 0).sum(axis=1) == k).all(), counts


def test_shards_errors() -> None:
    with pytest.raises(DataError, match=r"4 clients x classes_per_client=2 cover only 8 of 10 classes"):
        partition(LABELS, 4, PartitionConfig(kind="shards", classes_per_client=2), seed=0)
    with pytest.raises(DataError, match="classes_per_client=11 exceeds the 10 classes"):
        partition(LABELS, 4, PartitionConfig(kind="shards", classes_per_client=11), seed=0)


def test_single_partition_holds_everything_and_bad_counts() -> None:
    for cfg in CONFIGS:
        (only,) = partition(LABELS, 1, cfg, seed=0)
        assert np.array_equal(only, np.arange(len(LABELS)))
    with pytest.raises(DataError, match="num_partitions must be >= 1"):
        partition(LABELS, 0, CONFIGS[0], seed=0)
    with pytest.raises(DataError, match="3 samples cannot fill 5 partitions"):
        partition(LABELS[:3], 5, CONFIGS[0], seed=0)


def test_partition_summary_and_table() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    counts = partition_summary(labels, parts, 3)
    assert counts.tolist() == [[1, 1, 0], [1, 0, 3]]
    np.testing.assert_allclose(label_entropy(counts), [1.0, -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))])
    table = format_partition_summary(counts, ["a", "b", "c"]).splitlines()
    assert table[0] == "| client | a | b | c | total | entropy (bits) |"
    assert table[3] == "| 1 | 1 | 0 | 3 | 4 | 0.81 |"


def test_partition_table_of_a_run_config_counts_every_training_sample() -> None:
    from pipeline.config import config_from_dict
    from pipeline.data import partition_table

    cfg = config_from_dict({"data": {"train_limit": 300, "partition": {"kind": "dirichlet", "alpha": 0.5}}})
    rows = [r for r in partition_table(cfg, 4).splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert len(rows) == 4
    assert sum(int(r.split("|")[-3]) for r in rows) == 300
