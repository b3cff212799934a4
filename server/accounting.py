"""Communication accounting: bytes down and up per client per round, measured on the ArrayRecord payloads.

The strategy records the size of every ArrayRecord it sends and every one it receives (dropped replies
included: their bytes did travel). Sizes are the serialized array buffers (``pipeline.transport.wire.
record_nbytes``), i.e. what actually crosses the wire, not an estimate from parameter counts. Beside them it
records the whole serialised Message (``message_bytes_*``: Flower's protobuf of buffers, array metadata,
metric and config records and message metadata) and the upload split per tensor group
(``bytes_up_<group>_per_client``: codec / excluded / bn / header).
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
    message_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    message_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    up_groups: dict[str, int] = field(default_factory=lambda: defaultdict(int))

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
            "message_bytes_down": int(sum(self.message_down.values())),
            "message_bytes_up": int(sum(self.message_up.values())),
            **{f"bytes_up_{g}_per_client": int(n // len(self.up)) if self.up else 0
               for g, n in sorted(self.up_groups.items())},
        }


class ByteLedger:
    """Collects :class:`RoundTraffic` per round; totals come from the history so they survive a resume."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundTraffic] = defaultdict(RoundTraffic)

    def sent(self, server_round: int, node_id: int, nbytes: int, message_bytes: int = 0) -> None:
        """Record ``nbytes`` of arrays (``message_bytes`` of whole message) sent to ``node_id`` in ``server_round``."""
        traffic = self.rounds[server_round]
        traffic.down[int(node_id)] += int(nbytes)
        traffic.message_down[int(node_id)] += int(message_bytes)

    def received(self, server_round: int, node_id: int, nbytes: int, message_bytes: int = 0,
                 groups: dict[str, int] | None = None) -> None:
        """Record ``nbytes`` of arrays (whole message, per tensor group) received from ``node_id``."""
        traffic = self.rounds[server_round]
        traffic.up[int(node_id)] += int(nbytes)
        traffic.message_up[int(node_id)] += int(message_bytes)
        for group, n in (groups or {}).items():
            traffic.up_groups[group] += int(n)

    def summary(self, server_round: int) -> dict[str, Any]:
        """The bytes keys of one round's history record."""
        return self.rounds[server_round].summary()

