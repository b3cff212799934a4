"""The server's side of the ``delta`` downlink (:mod:`pipeline.transport.downlink`): the shadow model, which
node holds which round of it, and the payload each node gets."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from pipeline.config import TransportConfig
from pipeline.transport.downlink import DELTA, FULL, apply_delta, encode_delta
from pipeline.transport.wire import encode_state

SHADOW_PREFIX = "downlink_shadow/"


class DeltaDownlink:
    """Shadow ``S_r`` of the global model, the delta record of the round, and each node's base round."""

    def __init__(self, transport: TransportConfig, seed: int) -> None:
        self.transport, self.seed = transport, seed
        self.shadow: dict[str, torch.Tensor] | None = None
        self.shadow_round = 0
        self.holds: dict[int, int] = {}  # node id -> round of the shadow it holds (as far as the server knows)
        self._delta: ArrayRecord | None = None
        self._full: ArrayRecord | None = None

    def advance(self, server_round: int, master: dict[str, torch.Tensor]) -> None:
        """Move the shadow to round ``server_round`` towards ``master`` (the first round copies it)."""
        if self.shadow is None or self.shadow_round != server_round - 1:
            self.shadow, self._delta = {k: v.float().clone() for k, v in master.items()}, None
        else:
            change = {k: master[k].float() - self.shadow[k] for k in master}
            self._delta = encode_delta(change, self.transport, self.seed, server_round)
            self.shadow = apply_delta(self.shadow, self._delta, self.transport, server_round)
        self.shadow_round = server_round
        self._full = encode_state(self.shadow, "fp32")

    def payload(self, node: int) -> tuple[ArrayRecord, str, int]:
        """(record, ``delta``/``full``, base round) for ``node`` this round; the node then holds this round."""
        assert self._full is not None, "advance() first"
        held = self.holds.get(node)
        self.holds[node] = self.shadow_round
        if self._delta is not None and held == self.shadow_round - 1:
            return self._delta, DELTA, held
        return self._full, FULL, 0

    def settle(self, server_round: int, answered: set[int]) -> None:
        """After round ``server_round``'s replies: a node sent this round's model that did not answer without an
        error (offline, timed out, crashed before or after storing it) is forgotten, so its next message is the
        full model instead of a delta it may not be able to apply (which would cost it a round)."""
        for node in [n for n, r in self.holds.items() if r == server_round and n not in answered]:
            self.holds.pop(node)

    def forget(self, node: int) -> None:
        """``node`` reported that it lacks the base it was sent a delta for: it gets the full model next."""
        self.holds.pop(node, None)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The shadow and its round, for the round checkpoint (a resumed run sends every node the full model)."""
        if self.shadow is None:
            return {}
        out = {f"{SHADOW_PREFIX}{k}": v.numpy() for k, v in self.shadow.items()}
        out[f"{SHADOW_PREFIX}#round"] = np.asarray([self.shadow_round], dtype=np.int64)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state_arrays`."""
        part = {k[len(SHADOW_PREFIX):]: v for k, v in arrays.items() if k.startswith(SHADOW_PREFIX)}
        if part:
            self.shadow_round = int(np.asarray(part.pop("#round")).reshape(-1)[0])
            self.shadow = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in part.items()}
