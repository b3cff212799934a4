"""Experiment tracking: local and Flower runs logged to the embedded MLflow store and to TensorBoard, read back
with MLflow's own client and TensorBoard's own reader; a real ``mlflow server``; failures that must never lose
a run. (The Ray run is logged in ``tests/engines/test_ray_e2e.py``, so no extra Ray start is needed.)

The autouse fixture of ``tests/conftest.py`` turns tracking off for every other test; these remove it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.checkpoint import check_resume, config_fingerprint
from pipeline.cli import main
from pipeline.config import ConfigError, config_from_dict
from pipeline.stages import RUN_FILES
from pipeline.tracking import STATE_FILE, open_tracker, track_finish

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

MLFLOW_CLI = str(Path(sys.executable).parent / "mlflow")
REPO = Path(__file__).resolve().parents[2]
EPOCH_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "seconds")


@pytest.fixture(autouse=True)
def _tracking_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMPACTFL_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server fails at once instead of
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")  # retrying for minutes


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output folder (so one embedded store: creating its schema costs seconds) for the runs below."""
    return tmp_path_factory.mktemp("tracked") / "runs"


def tiny(out: Path, name: str, epochs: int = 2, **tracking: Any) -> dict[str, Any]:
    """A seconds-long SmallNet-3 local run on a slice of the embedded subset."""
    return {"name": name, "seed": 1, "device": "cpu", "output": str(out),
            "data": {"train_limit": 64, "test_limit": 64, "augment": False}, "model": {"name": "smallnet3"},
            "train": {"epochs": epochs, "batch_size": 32, "eval_batch_size": 64, "max_batches": 2},
            "tracking": tracking}


def run_cli(tmp_path: Path, raw: dict[str, Any], *sets: str) -> Path:
    """``compactfl run --quiet CONFIG --set ...`` (the user's path); returns the run dir."""
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", "--quiet", str(path), *[a for s in sets for a in ("--set", s)]]) == 0
    return Path(raw["output"]) / raw["name"]


def mlflow_run_of(run_dir: Path):
    """(client, run) of the MLflow run a run dir recorded in tracking.json."""
    record = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    return client, client.get_run(record["run_id"])


def series(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id)}


def assert_history_logged(client: MlflowClient, run_id: str, history: list[dict[str, Any]], step_key: str,
                          keys: tuple[str, ...]) -> None:
    for key in keys:
        assert series(client, run_id, key) == [(r[step_key], pytest.approx(r[key])) for r in history], key


# ---------------------------------------------------------------------------------------------- local
def test_local_run_logs_params_metrics_artifacts_tensorboard_and_resume_continues(tmp_path: Path,
                                                                                   store: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.export import export_onnx

    raw = tiny(store, "local", epochs=1, tensorboard={"enabled": True})
    run_dir = run_cli(tmp_path, raw)
    first_id = mlflow_run_of(run_dir)[1].info.run_id
    run_cli(tmp_path, raw, "train.epochs=2", "resume=true")  # continues the same MLflow run at epoch 2
    assert (store / "mlflow.db").is_file() and (store / "mlartifacts").is_dir()
    client, run = mlflow_run_of(run_dir)
    assert run.info.run_id == first_id and run.info.status == "FINISHED" and run.info.run_name == "local"
    assert client.get_experiment(run.info.experiment_id).name == "compactfl"
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 'local'")) == 1
    params = run.data.params
    assert params["model.name"] == "smallnet3" and params["train.batch_size"] == "32"
    assert params["engine.kind"] == "local" and params["data.root"] == "null"
    tags = run.data.tags
    assert (tags["engine"], tags["model"], tags["compression"], tags["distill"]) == ("local", "smallnet3", "none",
                                                                                      "none")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert_history_logged(client, run.info.run_id, metrics["history"], "epoch", EPOCH_METRICS)
    summary = metrics["summary"]
    assert run.data.metrics["summary/test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert run.data.metrics["summary/params_deploy"] == summary["params_deploy"]
    assert {"model.safetensors", "model.json", "report.md", "metrics.json", "config.yaml", "curves.png",
            "params.png"} <= artifacts(client, run.info.run_id)

    export_onnx(run_dir)  # a later export lands in the same run
    assert "model.onnx" in artifacts(client, run.info.run_id)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert set(EPOCH_METRICS) | {"summary/test_accuracy"} <= set(events.Tags()["scalars"])
    for key in ("train_loss", "test_accuracy"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in metrics["history"]]


# --------------------------------------------------------------------------------------------- flower
def test_flower_server_logs_every_round_with_bytes_and_replies(store: Path) -> None:
    from clients.app import app as client_app
    from server.local_grid import LocalGrid
    from server.runner import run_server

    raw = {**tiny(store, "fl"), "seed": 3, "model": {"name": "smallnet3"},
           "data": {"train_limit": 96, "test_limit": 64, "augment": False, "partition": {"kind": "iid"}},
           "engine": {"kind": "flower", "rounds": 2, "clients": 2}, "transport": {"dtype": "bf16"}}
    cfg = config_from_dict(raw)
    run_server(LocalGrid(client_app, cfg.engine.clients), cfg, cfg.run_dir)
    client, run = mlflow_run_of(cfg.run_dir)
    history = json.loads((cfg.run_dir / "metrics.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2]
    assert_history_logged(client, run.info.run_id, history, "round",
                          ("train_loss", "test_loss", "test_accuracy", "bytes_up", "bytes_down", "replies_ok",
                           "replies_failed", "replies_dropped", "seconds"))
    for key in ("bytes_up", "bytes_down"):
        cumulative = [history[0][key], history[0][key] + history[1][key]]
        assert [v for _, v in series(client, run.info.run_id, f"{key}_cumulative")] == cumulative
    assert run.data.tags["engine"] == "flower" and run.data.tags["transport_dtype"] == "bf16"
    assert run.data.params["engine.rounds"] == "2" and run.info.status == "FINISHED"
    assert {"model.safetensors", "model.json", "report.md"} <= artifacts(client, run.info.run_id)


# ------------------------------------------------------------------------------------- a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server at {url} not healthy after {timeout:.0f}s")


@pytest.mark.slow  # a second process
def test_a_real_mlflow_server_receives_the_run(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [MLFLOW_CLI, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(url, proc, timeout=180)
        raw = tiny(tmp_path / "runs", "served", mlflow={"uri": url, "experiment": "served-exp"})
        run_dir = run_cli(tmp_path, raw)
        client, run = mlflow_run_of(run_dir)
        assert client.tracking_uri == url and not (tmp_path / "runs" / "mlflow.db").exists()
        assert client.get_experiment(run.info.experiment_id).name == "served-exp"
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        assert_history_logged(client, run.info.run_id, history, "epoch", ("train_loss", "test_accuracy"))
        assert run.data.params["train.epochs"] == "2" and run.info.status == "FINISHED"
        assert {"model.safetensors", "model.json", "report.md"} <= artifacts(client, run.info.run_id)
        assert (tmp_path / "server-artifacts").is_dir()  # uploaded through the server, stored on its side
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group of our child (the server and its uvicorn workers)."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------- failures are safe
class _NotMlflow:
    """A TCP listener that accepts and hangs up: reachable, but not a tracking server."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow  # a second process
def test_an_unreachable_tracking_uri_leaves_the_run_complete_with_one_warning(tmp_path: Path) -> None:
    """A whole ``compactfl run`` in a subprocess, so stderr is exactly what a user sees."""
    raw = tiny(tmp_path / "runs", "lost", mlflow={"uri": f"http://127.0.0.1:{free_port()}"})
    (tmp_path / "lost.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("COMPACTFL_TRACKING", None)
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--quiet", str(tmp_path / "lost.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "lost"
    for name in (*RUN_FILES, "run.log"):
        assert (run_dir / name).is_file(), name
    noisy = [line for line in done.stderr.splitlines() if "mlflow" in line.lower() or "tracking" in line.lower()]
    assert len(noisy) == 1 and "tracking: mlflow disabled for this run" in noisy[0], done.stderr[-3000:]
    assert (run_dir / "run.log").read_text().count("tracking: mlflow disabled") == 1


class _Warnings(logging.Handler):
    """Collects the warnings of ``compactfl.tracking`` (that logger does not propagate to caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> _Warnings:
        logging.getLogger("compactfl.tracking").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("compactfl.tracking").removeHandler(self)


def exercise(cfg) -> Any:
    """What an engine does with a tracker: open, two steps, finish."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    tracker = open_tracker(cfg, cfg.run_dir)
    tracker.log_history([{"epoch": 1, "train_loss": 1.5}, {"epoch": 2, "train_loss": 1.25}])
    tracker.finish({"test_accuracy": 0.5})
    return tracker


def test_a_server_that_is_not_mlflow_fails_fast_with_one_warning(tmp_path: Path) -> None:
    listener = _NotMlflow()  # accepts connections and hangs up: the MLflow client itself must give up quickly
    try:
        cfg = config_from_dict(tiny(tmp_path, "odd", mlflow={"uri": f"http://127.0.0.1:{listener.port}"}))
        started = time.perf_counter()
        with _Warnings() as seen:
            tracker = exercise(cfg)
        elapsed = time.perf_counter() - started
    finally:
        listener.close()
    assert tracker.backends == [] and len(seen.lines) == 1, seen.lines
    assert seen.lines[0].startswith("tracking: mlflow disabled for this run"), seen.lines
    assert elapsed < 30, f"took {elapsed:.0f}s"


def test_a_missing_mlflow_package_warns_once_and_tensorboard_still_works(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    monkeypatch.delitem(sys.modules, "pipeline.tracking.mlflow_backend", raising=False)
    cfg = config_from_dict(tiny(tmp_path, "nomlflow", tensorboard={"enabled": True}))
    with _Warnings() as seen:
        tracker = exercise(cfg)
    assert [b.name for b in tracker.backends] == ["tensorboard"]
    assert len(seen.lines) == 1 and seen.lines[0].startswith("tracking: mlflow disabled"), seen.lines
    assert list((cfg.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_an_unexpected_tracker_error_never_reaches_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.tracking.tracker as tracker_module

    def broken(cfg, run_dir):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tracker_module, "open_tracker", broken)
    cfg = config_from_dict(tiny(tmp_path, "guarded"))
    with _Warnings() as seen:
        for n in (1, 2):
            tracker_module.track_history(cfg, cfg.run_dir, [{"epoch": e, "train_loss": 1.0} for e in range(1, n + 1)])
        tracker_module.track_finish(cfg, cfg.run_dir, [], {"test_accuracy": 0.5})
    assert seen.lines == ["tracking: disabled for this run (RuntimeError: disk on fire); training continues"]


def test_resume_skips_logged_steps_and_a_newly_enabled_backend_gets_them_all(store: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = [{"epoch": e, "train_loss": 2.0 / e, "bytes_up": 10} for e in (1, 2, 3)]
    first = open_tracker(config_from_dict(tiny(store, "r")), store / "r")
    first.log_history(history[:2])  # then the process dies: no finish
    resumed_cfg = config_from_dict({**tiny(store, "r", tensorboard={"enabled": True}), "resume": True})
    resumed = open_tracker(resumed_cfg, store / "r")
    resumed.log_history(history)
    resumed.finish({"test_accuracy": 0.5})
    client, run = mlflow_run_of(store / "r")
    assert run.info.run_id == first.state["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert series(client, run.info.run_id, "train_loss") == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3))]
    assert series(client, run.info.run_id, "bytes_up_cumulative") == [(1, 10), (2, 20), (3, 30)]
    events = EventAccumulator(str(store / "r" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3]
    assert json.loads((store / "r" / STATE_FILE).read_text())["logged"] == {"mlflow": 3, "tensorboard": 3}


# ------------------------------------------------------------------------------ config and wiring
def test_tracking_settings_parse_and_stay_out_of_resume_fingerprints(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    base = tiny(tmp_path, "fp")
    other = config_from_dict(copy.deepcopy(base), [
        "tracking.mlflow.uri=http://10.0.0.1:5000", "tracking.mlflow.enabled=false",
        "tracking.tensorboard.enabled=true", "tracking.mlflow.experiment=x"])
    plain = config_from_dict(base)
    assert plain.tracking.mlflow.enabled and plain.tracking.mlflow.uri is None
    assert plain.tracking.mlflow.experiment == "compactfl" and not plain.tracking.tensorboard.enabled
    assert other.tracking.mlflow.uri == "http://10.0.0.1:5000" and other.tracking.tensorboard.enabled
    check_resume(config_fingerprint(plain), other, "ckpt")  # tracking may change on resume: no error
    flower = {**base, "engine": {"kind": "flower"}}
    check_resume(config_fingerprint(config_from_dict(copy.deepcopy(flower))), config_from_dict(
        copy.deepcopy(flower), ["tracking.tensorboard.enabled=true", "tracking.mlflow.enabled=false"]), "ckpt")
    with pytest.raises(ConfigError, match="tracking.mlflow.url: unknown key"):
        config_from_dict(base, ["tracking.mlflow.url=http://x"])
    monkeypatch.setenv("COMPACTFL_TRACKING", "off")
    assert open_tracker(plain, tmp_path).backends == [] and not (tmp_path / "mlflow.db").exists()


def test_nightly_logs_every_suite_run_under_one_experiment(tmp_path: Path, store: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Nightly's wiring, with the training replaced by a two-epoch history (the store is real)."""
    import pipeline.engines
    from pipeline.nightly.suite import NIGHTLY_EXPERIMENT, SuiteEntry, SuiteRun, run_entry

    def fake_engine(cfg, run_dir):
        history = [{"epoch": 1, "test_accuracy": 0.25}, {"epoch": 2, "test_accuracy": 0.5}]
        summary = {"test_accuracy": 0.5}
        track_finish(cfg, run_dir, history, summary)
        return summary

    monkeypatch.setattr(pipeline.engines, "run_engine", fake_engine)
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("a", "b"):
        (suite / f"{name}.yaml").write_text(yaml.safe_dump({"model": {"name": "smallnet3"}}))
        entry = SuiteEntry(name, suite / f"{name}.yaml", SuiteRun())
        assert "error" not in run_entry(entry, store.parent, [])  # runs go to store
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NIGHTLY_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    assert all(series(client, r.info.run_id, "test_accuracy") == [(1, 0.25), (2, 0.5)] for r in runs)
