"""The MLflow backend: an embedded SQLite store under the output folder, or any tracking server.

With no ``tracking.mlflow.uri`` the store is ``sqlite:///<output>/mlflow.db`` with artifacts in
``<output>/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows it). Uses an explicit
``MlflowClient``, never MLflow's process-global fluent state, so nothing else in the process is affected.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import MlflowTracking
from pipeline.logging_utils import get_logger
from pipeline.tracking.tracker import Backend

log = get_logger("tracking")

PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
CONNECT_TIMEOUT_S = 3.0


def embedded_uri(output: Path) -> str:
    """The embedded store of an output folder: ``sqlite:////abs/output/mlflow.db``."""
    return f"sqlite:///{Path(output).expanduser().resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast (ConnectionError) when an http(s) tracking server does not accept connections."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=timeout):
            return
    except OSError as exc:
        raise ConnectionError(f"tracking server {uri} is unreachable ({exc.strerror or exc})") from None


#: MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) could stall training for minutes
#: when a server dies mid-run; these bound it to under a minute, once (the backend is then switched off).
#: Set the variables yourself to override.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def _client(uri: str):
    from mlflow import MlflowClient

    if urlparse(uri).scheme in ("http", "https"):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)

    for name in ("mlflow.store.db.utils", "alembic"):  # schema creation chatter on a fresh embedded store
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


class MlflowBackend(Backend):
    """One MLflow run per compactfl run; ``previous`` (from tracking.json) continues it on resume."""

    name = "mlflow"

    def __init__(self, settings: MlflowTracking, output: Path, run_name: str, previous: dict[str, Any] | None) -> None:
        self.uri = settings.uri or embedded_uri(output)
        check_reachable(self.uri)
        Path(output).mkdir(parents=True, exist_ok=True)
        self.client = _client(self.uri)
        self.experiment = settings.experiment
        self.run_name = run_name
        self.embedded_artifacts = None if settings.uri else (Path(output).resolve() / "mlartifacts").as_uri()
        self.previous = previous or {}
        self.run_id: str | None = None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=self.embedded_artifacts)

    def start(self, params: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
        from mlflow.entities import Param, RunTag

        experiment_id = self._experiment_id()
        prev = self.previous
        logged: dict[str, str] = {}
        if prev.get("run_id") and prev.get("tracking_uri") == self.uri and prev.get("experiment_id") == experiment_id:
            self.run_id = prev["run_id"]
            logged = dict(self.client.get_run(self.run_id).data.params)
            self.client.update_run(self.run_id, status="RUNNING")
            self.continues = True
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        if tags.get("git_commit"):
            tags = {**tags, "mlflow.source.git.commit": tags["git_commit"]}
        new = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]  # params never change in MLflow
        for i in range(0, max(len(new), 1), PARAMS_PER_BATCH):
            batch_tags = [RunTag(k, v) for k, v in tags.items()] if i == 0 else []
            self.client.log_batch(self.run_id, params=new[i:i + PARAMS_PER_BATCH], tags=batch_tags)
        log.info("tracking: MLflow run %s (experiment %r) in %s", self.run_id, self.experiment, self.uri)
        return {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def log_artifact_to_run(record: dict[str, Any], path: Path) -> None:
    """Add ``path`` to the finished run named by a tracking.json ``mlflow`` record (``compactfl export``)."""
    check_reachable(record["tracking_uri"])
    _client(record["tracking_uri"]).log_artifact(record["run_id"], str(path))
