"""The weight of a reply in aggregation: a client's claimed ``num-examples``, capped by what the server knows.

A client's own claim is not a defensible weight (one client claiming a million examples would own FedAvg's
average). ``engine.example_weights`` picks the rule:
- ``partition`` (default): at most the size of the client's partition as the server computes it from the
  same config and seed (``pipeline.data.client_partition`` for training, the test shard for federated
  evaluation). Every compactfl node trains on such a partition, so the server always knows the true size;
  a client that claims another partition id is capped by that partition's size (a node keeps the id of
  its first accepted reply, and an id claimed by two nodes in one round is refused for both: see
  ``server.strategies``).
- ``median``: at most the round's median claim (for federations whose data the server cannot see; also
  the fallback, logged once, when ``partition`` finds no training split on the server).
- ``uniform``: every reply weighs 1.
- ``claimed``: the claim itself (Flower's behaviour; unsafe, for comparison only).
A reply never weighs more than it claims: a client that trained on fewer examples (``train.max_batches``)
keeps its smaller weight.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence

from pipeline.config import RunConfig

WEIGHT_RULES = ("partition", "median", "uniform", "claimed")
#: (split, partition id) -> number of examples the server knows that partition holds
SizeOf = Callable[[str, int], int]


def partition_sizes(cfg: RunConfig, num_partitions: int) -> SizeOf:
    """Server-side sizes of each client's training partition and test shard (computed once per id)."""
    from pipeline.data import client_partition, dataset_for

    @functools.cache
    def size_of(split: str, partition_id: int) -> int:
        if split == "train":
            return len(client_partition(cfg, partition_id, num_partitions))
        return len(range(partition_id, len(dataset_for(cfg.data, "test")), num_partitions))

    return size_of


def capped_weights(rule: str, claims: Sequence[tuple[int, int]], split: str, size_of: SizeOf | None = None
                   ) -> list[int]:
    """One weight per ``(partition id, claimed num-examples)`` under ``rule`` (module docstring)."""
    if rule not in WEIGHT_RULES:
        raise ValueError(f"engine.example_weights must be one of {', '.join(WEIGHT_RULES)}, got {rule!r}")
    if rule == "claimed":
        return [claim for _, claim in claims]
    if rule == "uniform":
        return [1 for _ in claims]
    if rule == "median":
        cap = statistics.median_low(claim for _, claim in claims) if claims else 0
        return [min(claim, cap) for _, claim in claims]
    if size_of is None:
        raise ValueError("engine.example_weights=partition needs the server-side partition sizes")
    return [min(claim, size_of(split, pid)) for pid, claim in claims]
