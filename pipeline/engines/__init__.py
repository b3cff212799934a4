"""The engines (local | flower | ray) and their dispatch; each engine ends with :func:`pipeline.stages.finish_run`.

- :mod:`pipeline.engines.local`: one process, per-epoch checkpoints and resume;
- :mod:`pipeline.engines.flower`: the Flower apps (``server/``, ``clients/``) in Flower's simulation runtime;
- :mod:`pipeline.engines.ray`: Ray Train V2 workers (``clients/ray_worker.py``) under DDP.

The Flower and Ray engines are imported lazily, so a local run needs neither Flower nor Ray to import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import RunConfig


def run_engine(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` on its engine and finish the run in ``run_dir``; returns the run summary."""
    kind = cfg.engine.kind
    if kind == "local":
        from pipeline.engines.local import run_local

        return run_local(cfg, run_dir)
    if kind == "flower":
        from pipeline.engines.flower import run_flower

        return run_flower(cfg, run_dir)
    if kind == "ray":
        from pipeline.engines.ray import run_ray

        return run_ray(cfg, run_dir)
    raise ValueError(f"engine.kind: unknown engine {kind!r} (expected local, flower or ray)")

