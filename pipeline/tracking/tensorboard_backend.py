"""The TensorBoard backend: event files with the run's scalars under ``<run dir>/tensorboard``.

``tensorboard --logdir runs`` then shows every run of an output folder side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.tracking.tracker import Backend

EVENTS_DIR = "tensorboard"


class TensorboardBackend(Backend):
    """Scalars per step; ``fresh`` (not a resume) first removes event files an earlier run left there."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, fresh: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(run_dir) / EVENTS_DIR
        if fresh and log_dir.is_dir():
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.fresh = fresh
        self.continues = not fresh
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def start(self, params: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
        if self.fresh:
            rows = "\n".join(f"| {k} | {v} |" for k, v in {**tags, **params}.items())
            self.writer.add_text("config", f"| key | value |\n|---|---|\n{rows}")
            self.writer.flush()
        return {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifacts(self, paths: list[Path]) -> None:
        """The files already sit in the run dir beside the event files: nothing to copy."""

    def finish(self, status: str) -> None:
        self.writer.close()
