"""Error feedback: what a lossy codec dropped from one update is added to the next one before encoding.

For each tensor, ``compensate`` returns ``update + residual`` and ``record`` stores
``residual = compensated - decode(encode(compensated))``, so over rounds every coordinate is eventually sent
(top-k and sign compression stall or diverge without it).

Policy for nodes that skip rounds (Flower ``fraction`` < 1, drop-outs): a residual is kept across the rounds
a node does not take part in and is multiplied by ``decay ** skipped`` when it is used again
(``skipped`` = rounds since the round it was recorded, minus one). ``decay = 1`` (the default) keeps it
whole: the dropped mass is delayed, never lost; ``decay < 1`` forgets stale corrections that no longer fit
the global model. A residual whose shape no longer fits the tensor (e.g. DDP rebuilt its buckets) is
discarded.

State is a flat dict of tensors (``residual/NAME`` and ``round/NAME``) for safetensors checkpoints.
"""

from __future__ import annotations

import torch


class ErrorFeedback:
    """Per-tensor residuals of one node (or one Ray rank), keyed by tensor (or bucket) name."""

    def __init__(self, decay: float = 1.0) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"error feedback decay must be in (0, 1], got {decay!r}")
        self.decay = decay
        self.residuals: dict[str, torch.Tensor] = {}
        self.rounds: dict[str, int] = {}

    def compensate(self, name: str, update: torch.Tensor, round: int) -> torch.Tensor:
        """``update + aged residual`` in fp32 (a new tensor; ``update`` is not modified)."""
        out = update.detach().float().clone()
        res = self.residuals.get(name)
        if res is None or res.shape != out.shape:
            return out
        skipped = max(0, round - self.rounds[name] - 1)
        factor = self.decay ** skipped
        return out.add_(res.to(out.device), alpha=factor)

    def record(self, name: str, compensated: torch.Tensor, decoded: torch.Tensor, round: int) -> None:
        """Store what the receiver will not see: ``compensated - decoded``."""
        self.residuals[name] = (compensated.float() - decoded.to(compensated.device).float()).detach()
        self.rounds[name] = int(round)

    def norm(self) -> float:
        """l2 norm of all residuals together (a health metric: it should stay bounded)."""
        total = sum(float(r.double().pow(2).sum()) for r in self.residuals.values())
        return total ** 0.5

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals and the round each was recorded in, as tensors (CPU) for a safetensors checkpoint."""
        out: dict[str, torch.Tensor] = {}
        for name, res in self.residuals.items():
            out[f"residual/{name}"] = res.detach().cpu().contiguous()
            out[f"round/{name}"] = torch.tensor([self.rounds[name]], dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the residuals by those of :meth:`state_dict` (a key without its pair is a ValueError)."""
        residuals, rounds = {}, {}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind == "residual":
                if not value.is_floating_point():
                    raise ValueError(f"error feedback state {key!r}: expected a float tensor, got {value.dtype}")
                residuals[name] = value.float().clone()
            elif kind == "round":
                if value.numel() != 1:
                    raise ValueError(f"error feedback state {key!r}: expected one round number")
                rounds[name] = int(value.reshape(-1)[0])
            else:
                raise ValueError(f"error feedback state: unexpected key {key!r}")
        if set(residuals) != set(rounds):
            odd = sorted(set(residuals) ^ set(rounds))[0]
            raise ValueError(f"error feedback state: {odd!r} lacks its residual or its round")
        self.residuals, self.rounds = residuals, rounds
