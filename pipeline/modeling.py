"""Build the training-time model a run asks for: architecture + compression (expand | csg | cheap).

Every engine and worker calls :func:`build_training_model`, seeded by the config seed, so all workers
start from identical weights and a frozen CSG generator is the same everywhere without travelling.
"""

from __future__ import annotations

import torch
from torch import nn

import models
from pipeline.config import RunConfig


def build_compact_model(cfg: RunConfig) -> nn.Module:
    """The plain architecture of the run (what a user deploys), before any compression."""
    return models.build(cfg.model.name, num_classes=cfg.data.num_classes, **cfg.model.kwargs)


def build_training_model(cfg: RunConfig) -> nn.Module:
    """The model that trains: expanded, CSG-compressed, cheapened or plain; deterministic under ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_compact_model(cfg)
        comp = cfg.compression
        if comp.kind == "expand":
            return models.expand(net, comp.strategy, rate=comp.rate, mode=comp.mode,
                                 skip_unsupported=comp.skip_unsupported)
        if comp.kind == "csg":
            generator = models.csg.load_generator(comp.generator) if comp.generator is not None else None
            return models.csg_compress(net, slice_shape=tuple(comp.slice_shape), code_size=comp.code_size,
                                       binary=comp.binary, generator=generator,
                                       train_generator=comp.train_generator,
                                       include_pointwise=comp.include_pointwise)
        if comp.kind == "cheap":
            return models.cheapen(net, block=comp.block)
        return net
