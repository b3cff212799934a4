"""Logging for runs: one ``compactfl`` logger to the console and to ``<run dir>/run.log``, plus progress.

Progress bars (rich) appear only on a TTY; elsewhere (CI, pipes, log files) each epoch/round is one plain
line, so logs stay greppable. ``--quiet`` silences the console below WARNING but keeps the run log complete.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOGGER_NAME = "compactfl"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_state: dict[str, Any] = {"quiet": False, "console": None, "live": None}


class _ConsoleHandler(logging.StreamHandler):
    """stderr handler that prints above a live progress bar (through rich) instead of tearing it."""

    def emit(self, record: logging.LogRecord) -> None:
        live = _state["live"]
        if live is None:
            super().emit(record)
            return
        try:
            live.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger (or a child ``compactfl.<name>``)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def setup_console(quiet: bool = False, level: int = logging.INFO) -> None:
    """Send ``compactfl`` records to stderr (WARNING and up when ``quiet``); idempotent."""
    logger = get_logger()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    _state["quiet"] = quiet
    handler = _state["console"]
    if handler is None:
        handler = _ConsoleHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        _state["console"] = handler
    handler.setLevel(logging.WARNING if quiet else level)


def is_quiet() -> bool:
    """Whether the console was set up with ``--quiet``."""
    return bool(_state["quiet"])


def attach_run_log(run_dir: Path) -> Path:
    """Log everything (DEBUG and up) to ``run_dir/run.log``; replaces any earlier run-log handler."""
    logger = get_logger()
    logger.setLevel(logging.DEBUG)
    for h in list(logger.handlers):
        if getattr(h, "compactfl_run_log", False):
            logger.removeHandler(h)
            h.close()
    path = Path(run_dir) / "run.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG)
    handler.compactfl_run_log = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    return path


def detach_run_log() -> None:
    """Close the run-log handler (so the file is complete and no longer held open)."""
    logger = get_logger()
    for h in list(logger.handlers):
        if getattr(h, "compactfl_run_log", False):
            logger.removeHandler(h)
            h.close()


def format_record(step_name: str, step: int, total: int, record: dict[str, Any]) -> str:
    """One plain progress line: ``epoch 3/10 train_loss=1.234 test_accuracy=0.456 ...``."""
    parts = [f"{step_name} {step}/{total}"]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "bytes_up", "bytes_down",
                "bytes_allreduce", "seconds"):
        if key in record and record[key] is not None:
            v = record[key]
            parts.append(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}")
    return " ".join(parts)


class Progress:
    """Epoch/round progress: a rich bar on an interactive console, one log line per step otherwise."""

    def __init__(self, total: int, step_name: str = "epoch", description: str = "training",
                 start: int = 0) -> None:
        self.total, self.step_name, self.description = total, step_name, description
        self._bar = None
        self._task = None
        if sys.stderr.isatty() and not is_quiet() and _state["live"] is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=False,
                                     console=Console(stderr=True))
            self._task = self._bar.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
            _state["live"] = self._bar
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            _state["live"] = None

    def update(self, step: int, record: dict[str, Any]) -> None:
        """Report step ``step`` (1-based) with its metrics record."""
        line = format_record(self.step_name, step, self.total, record)
        if self._bar is not None:
            info = " ".join(p for p in line.split(" ")[2:] if p.startswith(("train_loss", "test_accuracy")))
            self._bar.update(self._task, completed=step, info=info)
            get_logger().debug(line)  # file only: the bar already shows it on the console
        else:
            get_logger().info(line)


@contextmanager
def progress(total: int, step_name: str = "epoch", description: str = "training",
             start: int = 0) -> Iterator[Progress]:
    """Context manager around :class:`Progress`."""
    p = Progress(total, step_name, description, start)
    with p:
        yield p
