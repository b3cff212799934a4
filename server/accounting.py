"""Communication accounting: bytes down and up per client per round, measured on the ArrayRecord payloads.

The strategy records the size of every ArrayRecord it sends and every one it receives (dropped replies
included: their bytes did travel). Sizes are the serialized array buffers (``pipeline.transport.wire.
record_nbytes``), i.e. what actually crosses the wire, not an estimate from parameter counts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundTraffic:
    """Bytes of one round, keyed by node id."""

    down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    up: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def summary(self) -> dict[str, Any]:
        """Per-round totals and per-client means (the history record's bytes keys)."""
        down, up = sum(self.down.values()), sum(self.up.values())
        return {
            "bytes_down": int(down),
            "bytes_up": int(up),
            "bytes_down_per_client": int(down // len(self.down)) if self.down else 0,
            "bytes_up_per_client": int(up // len(self.up)) if self.up else 0,
            "clients_sent": len(self.down),
            "clients_replied": len(self.up),
        }


class ByteLedger:
    """Collects :class:`RoundTraffic` per round; totals come from the history so they survive a resume."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundTraffic] = defaultdict(RoundTraffic)

    def sent(self, server_round: int, node_id: int, nbytes: int) -> None:
        """Record ``nbytes`` of arrays sent to ``node_id`` in ``server_round``."""
        self.rounds[server_round].down[int(node_id)] += int(nbytes)

    def received(self, server_round: int, node_id: int, nbytes: int) -> None:
        """Record ``nbytes`` of arrays received from ``node_id`` in ``server_round``."""
        self.rounds[server_round].up[int(node_id)] += int(nbytes)

    def summary(self, server_round: int) -> dict[str, Any]:
        """The bytes keys of one round's history record."""
        return self.rounds[server_round].summary()

