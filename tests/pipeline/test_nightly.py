"""Nightly regression: a tiny suite calibrated in tmp passes against its baseline, fails loudly on a missing
baseline/entry/run, and planted silent regressions (lr halved, augmentation off, KD weight halved, one
client's update ignored) each fail and name the affected runs and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.nightly import DEFAULT_CHECKS, check_metric, compare

REPO = Path(__file__).resolve().parents[2]
COMMON = ("data: {train_limit: 256, test_limit: 128}\nmodel: {name: smallnet3}\n"
          "train: {lr: 0.05, weight_decay: 0.0, batch_size: 32, max_batches: 4, eval_batch_size: 128}\n")
TINY = {
    "tiny_local": "seed: 1\n",
    "tiny_kd": ("seed: 2\nteacher: {model: {name: smallnet3}, train: {lr: 0.05, batch_size: 32, epochs: 1, "
                "max_batches: 4}}\ndistill: {kind: kd, T: 4.0, alpha: 0.9}\n"),
    "tiny_flower": "seed: 3\nengine: {kind: flower, rounds: 2, clients: 3, local_epochs: 1}\n",
}
INDEX = ("runs:\n  tiny_local: {min: {test_accuracy: 0.0}}\n  tiny_kd: {}\n"
         "  tiny_flower: {runtime: in-process, max: {test_loss: 10.0}}\n")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny suite and its baseline, calibrated with 2 seeds."""
    d = tmp_path_factory.mktemp("nightly")
    suite = d / "suite"
    suite.mkdir()
    for name, text in TINY.items():
        (suite / f"{name}.yaml").write_text(text + COMMON)
    (suite / "suite.yaml").write_text(INDEX)
    baseline = d / "baseline.json"
    assert _nightly(suite, baseline, d / "cal", "--calibrate", "2") == 0
    return suite, baseline


def _nightly(suite: Path, baseline: Path, out: Path, *extra: str) -> int:
    return main(["nightly", "--quiet", "--suite", str(suite), "--baseline", str(baseline), "--output", str(out),
                 *extra])


def _failures(out: Path) -> set[tuple[str, str]]:
    report = json.loads((out / "nightly-report.json").read_text())
    return {(c["run"], c["metric"]) for c in report["checks"] if c["status"] == "FAIL"}


def test_calibrated_baseline_records_spread_and_provenance(calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    suite, baseline = calibrated
    doc = json.loads(baseline.read_text())
    assert doc["made_by"]["seeds_per_run"] == 2 and doc["made_by"]["torch"] and doc["made_by"]["commit"]
    assert list(doc["runs"]) == ["tiny_local", "tiny_kd", "tiny_flower"]
    local = doc["runs"]["tiny_local"]
    assert local["seeds"] == [1, 2] and len(local["stats"]["test_accuracy"]["values"]) == 2
    assert local["exact"]["train_lr"] == 0.05 and len(local["exact"]["first_batch_sha"]) == 16
    assert doc["runs"]["tiny_flower"]["exact"]["bytes_total"] > 0
    assert "teacher_test_accuracy" in doc["runs"]["tiny_kd"]["stats"]

    out = tmp_path / "n1"
    assert _nightly(suite, baseline, out) == 0, "an unchanged seeded suite must pass against its own baseline"
    report = json.loads((out / "nightly-report.json").read_text())
    statuses = {(c["run"], c["metric"]): c["status"] for c in report["checks"]}
    assert statuses[("tiny_flower", "fedavg_round1_error")] == "pass"
    assert statuses[("tiny_local", "test_accuracy")] == "pass"
    history = (out / "history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["passed"]
    assert (out / "nightly-trend.png").stat().st_size > 0
    assert "nightly-trend.png" in (out / "nightly-report.md").read_text()


def test_planted_regressions_fail_and_name_runs_and_metrics(calibrated: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.serverapp.strategy as flower_strategies

    import pipeline.data.loaders as loaders
    import pipeline.distill as distill
    import pipeline.train as train

    suite, baseline = calibrated
    cases = {}

    # 1. the learning rate silently halved in the schedule every engine reads (pipeline.train.lr_at)
    orig_lr_at = train.lr_at

    def half_lr(cfg, epoch, horizon=None):
        return orig_lr_at(cfg, epoch, horizon) / 2

    with monkeypatch.context() as m:
        m.setattr(train, "lr_at", half_lr)
        assert _nightly(suite, baseline, tmp_path / "lr") == 1
    cases["lr"] = _failures(tmp_path / "lr")
    assert ("tiny_local", "train_lr") in cases["lr"] and ("tiny_kd", "train_lr") in cases["lr"]

    # 2. augmentation silently off in the batch transform
    orig_apply = loaders.BatchTransform._apply

    def no_augment(self, data):
        self.augment = False
        return orig_apply(self, data)

    with monkeypatch.context() as m:
        m.setattr(loaders.BatchTransform, "_apply", no_augment)
        assert _nightly(suite, baseline, tmp_path / "aug") == 1
    assert {(r, "first_batch_sha") for r in TINY} <= _failures(tmp_path / "aug")

    # 3. the distillation loss weight halved (only the KD run uses it)
    orig_kd = distill.kd_loss

    def half_kd(s, t, y, T=4.0, alpha=0.9):
        return orig_kd(s, t, y, T=T, alpha=alpha / 2)

    with monkeypatch.context() as m:
        m.setattr(distill, "kd_loss", half_kd)
        assert _nightly(suite, baseline, tmp_path / "kd") == 1
    kd = _failures(tmp_path / "kd")
    assert {r for r, _ in kd} == {"tiny_kd"} and ("tiny_kd", "final_train_loss") in kd

    # 4. one client's update silently ignored by the server's aggregation
    orig_agg = flower_strategies.FedAvg.aggregate_train

    def drop_one(self, server_round, replies):
        return orig_agg(self, server_round, list(replies)[1:])

    with monkeypatch.context() as m:
        m.setattr(flower_strategies.FedAvg, "aggregate_train", drop_one)
        assert _nightly(suite, baseline, tmp_path / "agg") == 1
    agg = _failures(tmp_path / "agg")
    assert {r for r, _ in agg} == {"tiny_flower"} and ("tiny_flower", "fedavg_round1_error") in agg


def test_fails_loudly_on_missing_or_stale_baseline(calibrated: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    suite, baseline = calibrated
    assert _nightly(suite, tmp_path / "nope.json", tmp_path / "a") == 1
    assert "does not exist" in capsys.readouterr().err

    doc = json.loads(baseline.read_text())
    doc["runs"]["ghost"] = doc["runs"].pop("tiny_kd")
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(doc))
    assert _nightly(suite, stale, tmp_path / "b", "--only", "tiny_kd") == 1
    assert _failures(tmp_path / "b") == {("tiny_kd", "baseline"), ("ghost", "baseline")}

    (suite / "extra.yaml").write_text("seed: 1\n" + COMMON)
    try:
        assert _nightly(suite, baseline, tmp_path / "c") == 2  # a config not listed in suite.yaml
    finally:
        (suite / "extra.yaml").unlink()
    index = (suite / "suite.yaml").read_text()
    (suite / "suite.yaml").write_text(index + "  vanished: {}\n")  # listed, but its config is gone
    try:
        assert _nightly(suite, baseline, tmp_path / "c2") == 2
    finally:
        (suite / "suite.yaml").write_text(index)
    assert "vanished" in capsys.readouterr().err
    assert _nightly(suite, baseline, tmp_path / "d", "--only", "nope") == 2
    assert _nightly(suite, baseline, tmp_path / "e", "--set", "train.lr=-1") == 2


def test_check_kinds() -> None:
    band = DEFAULT_CHECKS["test_accuracy"]
    assert not check_metric("r", "test_accuracy", band, {"mean": 0.5, "std": 0.01}, 0.525).failed
    assert check_metric("r", "test_accuracy", band, {"mean": 0.5, "std": 0.01}, 0.46).failed  # 3 std = 0.03
    assert check_metric("r", "test_accuracy", band, {"mean": 0.5, "std": 0.0}, 0.479).failed  # floor 0.02
    assert check_metric("r", "test_loss", DEFAULT_CHECKS["test_loss"], {"mean": 2.0, "std": 0.1}, float("nan")).failed
    assert check_metric("r", "params_train", {"kind": "exact"}, 10, 11).failed
    assert check_metric("r", "params_train", {"kind": "exact"}, None, 11).failed  # never "new"
    assert check_metric("r", "test_loss", DEFAULT_CHECKS["test_loss"], None, 1.0).failed
    ratio = DEFAULT_CHECKS["wall_seconds"]
    assert check_metric("r", "wall_seconds", ratio, {"mean": 100.0, "std": 1.0}, 400.0).failed
    assert not check_metric("r", "wall_seconds", ratio, {"mean": 100.0, "std": 1.0}, 10.0).failed
    assert check_metric("r", "wall_seconds", ratio, {"mean": 5.0, "std": 1.0}, 400.0).status == "skip"
    assert check_metric("r", "fedavg_round1_error", DEFAULT_CHECKS["fedavg_round1_error"], None, 0.1).failed
    crashed = compare({"r": {"error": "ValueError: training diverged"}}, {"runs": {}}, {}, ["r"])
    assert len(crashed) == 1 and crashed[0].failed and "crashed" in crashed[0].reason
    below = compare({"r": {"test_accuracy": 0.2}}, {"runs": {"r": {}}}, {"r": ({"test_accuracy": 0.4}, {})}, ["r"])
    assert ("test_accuracy", "floor") in {(c.metric, c.kind) for c in below if c.failed}


def test_repo_suite_and_baseline_agree() -> None:
    from pipeline.nightly.suite import load_suite

    entries = load_suite(REPO / "configs" / "nightly")
    cfgs = [e.config([]) for e in entries]
    assert {c.engine.kind for c in cfgs} == {"local", "flower", "ray"}
    assert {"none", "expand", "csg", "cheap"} <= {c.compression.kind for c in cfgs}
    assert {"kd", "at"} <= {c.distill.kind for c in cfgs}
    assert all(e.spec.min.get("test_accuracy", 0) >= 0.25 for e in entries), "every run must clear chance"
    baseline = json.loads((REPO / "regression" / "baseline.json").read_text())
    names = [e.name for e in entries]
    # every suite run has an entry, no stale entry, suite order (nightly itself fails on a missing entry)
    assert list(baseline["runs"]) == names, "recalibrate: compactfl nightly --calibrate 3"
    for run, entry in baseline["runs"].items():
        assert entry["stats"]["test_accuracy"]["mean"] >= {e.name: e for e in entries}[run].spec.min["test_accuracy"]
        assert entry["exact"]["params_deploy"] > 0 and entry["seeds"]


def test_entries_run_with_the_baselines_thread_count_whatever_the_environment() -> None:
    """Short federated runs differ with the summation order: every entry runs at NIGHTLY_THREADS, then restores."""
    import torch

    from pipeline.nightly.baseline import NIGHTLY_THREADS, provenance
    from pipeline.nightly.suite import pinned_threads

    before = torch.get_num_threads()
    with pinned_threads():
        assert torch.get_num_threads() == NIGHTLY_THREADS
    assert torch.get_num_threads() == before
    assert provenance()["torch_threads"] == NIGHTLY_THREADS
