"""Parameter and MAC counting (MACs from ``torch.utils.flop_counter``: FLOPs / 2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.state import BN_STAT_NAMES, unwrap


def count_params(model: nn.Module, include_buffers: bool = False) -> int:
    """Trainable parameters (shared ones once); with ``include_buffers`` also BN running mean/var.

    ``include_buffers=True`` is Moonshine's counting convention (its Tables 3 and 4).
    """
    m = unwrap(model)
    total = sum(p.numel() for p in m.parameters() if p.requires_grad)
    if include_buffers:
        total += sum(b.numel() for n, b in m.named_buffers() if n.rsplit(".", 1)[-1] in BN_STAT_NAMES)
    return total


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Multiply-accumulates of one eval-mode forward pass on a zero input of ``input_shape``."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    try:
        param = next(iter(m.parameters()), None)
        x = torch.zeros(input_shape, dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else "cpu")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x)
        return int(counter.get_total_flops()) // 2
    finally:
        m.train(was_training)
