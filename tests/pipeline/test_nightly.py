"""Nightly regression: a seeded suite matches its own baseline, and a planted regression (lr x100) is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.nightly import DEFAULT_CHECKS, check_metric, compare

REPO = Path(__file__).resolve().parents[2]
SUITE = {
    "plain": "seed: 1\nmodel: {name: smallnet3}\ncompression: {kind: none}\n",
    "expand": "seed: 2\nmodel: {name: smallnet7}\ncompression: {kind: expand, strategy: cl, rate: 2}\n",
}
COMMON = ("data: {train_limit: 512, test_limit: 128}\n"
          "train: {lr: 0.05, weight_decay: 0.0, batch_size: 64, epochs: 1, max_batches: 4, eval_batch_size: 128}\n")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("suite")
    for name, text in SUITE.items():
        (d / f"{name}.yaml").write_text(text + COMMON)
    return d


def _nightly(suite: Path, tmp: Path, out: str, *extra: str) -> int:
    return main(["nightly", "--quiet", "--suite", str(suite), "--baseline", str(tmp / "baseline.json"),
                 "--output", str(tmp / out), *extra])


def test_nightly_passes_on_its_baseline_and_catches_a_planted_regression(suite: Path, tmp_path: Path) -> None:
    assert _nightly(suite, tmp_path, "n0", "--update-baseline") == 0
    baseline = json.loads((tmp_path / "baseline.json").read_text())
    assert set(baseline["runs"]) == {"plain", "expand"}
    assert baseline["runs"]["expand"]["params_train"] > baseline["runs"]["expand"]["params_deploy"]
    baseline["checks"]["wall_seconds"]["tol"] = 1000.0  # tolerances live in the baseline; a shared box is noisy
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))

    assert _nightly(suite, tmp_path, "n1") == 0, "an unchanged seeded suite must reproduce its baseline"
    report = json.loads((tmp_path / "n1" / "nightly-report.json").read_text())
    assert report["passed"] and all(c["status"] in ("pass", "skip") for c in report["checks"])

    assert _nightly(suite, tmp_path, "n2", "--set", "train.lr=5.0") == 1  # lr x100: a planted regression
    report = json.loads((tmp_path / "n2" / "nightly-report.json").read_text())
    failed = {(c["run"], c["metric"]) for c in report["checks"] if c["status"] == "FAIL"}
    assert {run for run, _ in failed} == {"plain", "expand"}
    assert all(m in ("test_loss", "test_accuracy", "final_train_loss", "run") for _, m in failed)
    assert "**FAIL**" in (tmp_path / "n2" / "nightly-report.md").read_text()


def test_check_kinds() -> None:
    assert check_metric("r", "params_train", {"kind": "exact"}, 10, 11).failed
    assert not check_metric("r", "params_train", {"kind": "exact"}, 10, 10).failed
    assert check_metric("r", "test_accuracy", {"kind": "abs", "tol": 0.03}, 0.5, 0.46).failed
    assert not check_metric("r", "test_accuracy", {"kind": "abs", "tol": 0.03}, 0.5, 0.48).failed
    assert check_metric("r", "test_loss", {"kind": "rel", "tol": 0.1}, 2.0, float("nan")).failed
    assert check_metric("r", "wall_seconds", {"kind": "ratio", "tol": 3.0, "min_seconds": 10}, 100, 400).failed
    assert not check_metric("r", "wall_seconds", {"kind": "ratio", "tol": 3.0, "min_seconds": 10}, 100, 10).failed
    assert check_metric("r", "wall_seconds", {"kind": "ratio", "tol": 3.0, "min_seconds": 10}, 5, 400).status == "skip"
    assert check_metric("r", "test_loss", DEFAULT_CHECKS["test_loss"], None, 1.0).status == "new"
    crashed = compare({"r": {"error": "ValueError: training diverged"}}, {"runs": {"r": {"test_loss": 1.0}}})
    assert len(crashed) == 1 and crashed[0].failed


def test_repo_suite_and_baseline_agree() -> None:
    suite = sorted((REPO / "configs" / "nightly").glob("*.yaml"))
    engines = {load_config(p).engine.kind for p in suite}
    comps = {load_config(p).compression.kind for p in suite}
    distills = {load_config(p).distill.kind for p in suite}
    assert engines == {"local", "flower", "ray"} and {"expand", "csg", "cheap"} <= comps and {"kd", "at"} <= distills
    baseline = json.loads((REPO / "regression" / "baseline.json").read_text())
    assert set(baseline["runs"]) == {p.stem for p in suite}, "re-record with: compactfl nightly --update-baseline"
