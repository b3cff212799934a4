"""Experiment tracking (MLflow, TensorBoard) from the process that owns the run dir.

- :mod:`pipeline.tracking.tracker`: the backend interface, the factory and the calls engines make
  (:func:`track_history`, :func:`track_finish`, :func:`track_artifact`);
- :mod:`pipeline.tracking.mlflow_backend`: embedded SQLite store under the output folder, or any server;
- :mod:`pipeline.tracking.tensorboard_backend`: event files under ``<run dir>/tensorboard``.
Backends are imported only when enabled, so a run without tracking never imports MLflow.
"""

from pipeline.tracking.tracker import (
    DISABLE_ENV,
    STATE_FILE,
    open_tracker,
    track_artifact,
    track_finish,
    track_history,
)

__all__ = ["DISABLE_ENV", "STATE_FILE", "open_tracker", "track_artifact", "track_finish", "track_history"]
