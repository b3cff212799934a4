"""End-to-end local runs: the demo config, the run dir contract, resume, export and the multi-run report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import models
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import test_loader
from pipeline.engines import local as local_engine
from pipeline.modeling import build_training_model
from pipeline.report import PLOTS
from pipeline.stages import RUN_FILES, finish_run, load_run, prepare_run_dir
from pipeline.train import evaluate

TINY = ["train.epochs=1", "train.max_batches=2", "train.batch_size=32", "data.test_limit=64",
        "train.eval_batch_size=64"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "--quiet", *_sets([*TINY, "train.epochs=2", f"output={out}"])]) == 0
    return out / "demo"


def test_demo_run_dir_holds_every_artifact(demo_run: Path) -> None:
    for name in (*RUN_FILES, *PLOTS, "run.log"):
        assert (demo_run / name).is_file(), name
        assert (demo_run / name).stat().st_size > 0, name
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    for r in metrics["history"]:
        assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"} <= set(r)
    s = metrics["summary"]
    assert s["engine"] == "local" and s["compression"] == "expand ck r=4" and s["bytes_total"] == 0
    assert s["params_train"] > s["params_deploy"] and s["macs_train"] > s["macs_deploy"]
    assert s["finalize_max_abs_diff"] < 1e-3, "contraction must reproduce the trained ExpandNet"
    assert (demo_run / "config.yaml").read_text().startswith("seed: 0")
    assert "epoch 2/2" in (demo_run / "run.log").read_text()


def test_run_dir_rebuilds_the_compact_model(demo_run: Path) -> None:
    model, meta, metrics = load_run(demo_run)
    assert meta["spec"]["name"] == "smallnet7" and not models.has_reparameterized(model)
    assert models.count_params(model) == models.count_params(models.build("smallnet7"))
    assert models.count_params(model) == metrics["summary"]["params_deploy"]
    cfg = load_config(demo_run / "config.yaml")
    assert evaluate(model, test_loader(cfg))["test_accuracy"] == pytest.approx(metrics["summary"]["test_accuracy"])


def test_export_onnx_matches_pytorch(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(demo_run), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert (demo_run / "model.onnx").stat().st_size > 10_000
    assert "onnxruntime check" in out


def test_report_compares_runs(demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(demo_run), str(demo_run), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "comparison.md").read_text().count("| demo |") == 2


def test_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = [*TINY, "model.name=smallnet3", "compression={kind: none}", f"output={tmp_path}", "train.epochs=2",
            "train.schedule=cosine"]
    assert main(["run", "--quiet", *_sets([*base, "name=straight"])]) == 0

    real_save = local_engine.save_epoch_checkpoint

    def save_then_crash(*args, **kwargs) -> None:  # the process dies right after the first epoch's checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(local_engine, "save_epoch_checkpoint", save_then_crash)
    assert main(["run", "--quiet", *_sets([*base, "name=resumed"])]) == 130
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(local_engine, "save_epoch_checkpoint", real_save)
    assert main(["run", "--quiet", *_sets([*base, "name=resumed", "resume=true"])]) == 0
    a = safetensors.torch.load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    hist = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [r["epoch"] for r in hist["history"]] == [1, 2] and hist["summary"]["resumed_from_epoch"] == 1
    assert [r["lr"] for r in hist["history"]] == [0.05, pytest.approx(0.025)]  # cosine over 2 epochs, continued


def test_resume_refuses_a_changed_config_and_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [*TINY, "compression={kind: none}", f"output={tmp_path}", "name=r", "model.name=smallnet3", "train.epochs=2"]
    assert main(["run", "--quiet", *_sets(base)]) == 0
    capsys.readouterr()
    for change, key in [("model.name=smallnet7", "model.name"), ("train.lr=0.1", "train.lr"),
                        ("data.augment=false", "data.augment"), ("seed=1", "seed")]:
        assert main(["run", "--quiet", *_sets([*base, change, "resume=true"])]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("compactfl: resume: ") and f"different {key} " in err, err
    assert main(["run", "--quiet", *_sets([*base, "train.epochs=1", "resume=true"])]) == 2
    assert "train.epochs=2; a resume may only extend it" in capsys.readouterr().err
    assert main(["run", "--quiet", *_sets([*base, "train.epochs=3", "resume=true"])]) == 0  # epochs may grow
    hist = json.loads((tmp_path / "r" / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in hist] == [1, 2, 3]


@pytest.mark.parametrize("overrides", [
    ["model.name=resnet20", "compression={kind: csg, slice_shape: [16, 16, 3, 3], code_size: 128}"],
    ["model.name=wrn-10-2", "compression={kind: cheap, block: G(2)}"],
    ["model.name=smallnet7", "compression={kind: expand, strategy: cl, rate: 2}"],
], ids=["csg", "cheap", "expand-cl"])
def test_finish_run_for_every_compression(overrides: list[str], tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, *overrides, f"output={tmp_path}", "name=f"])
    run_dir = prepare_run_dir(cfg)
    trained = build_training_model(cfg)
    history = [{"epoch": 1, "train_loss": 2.3, "train_accuracy": 0.1, "test_loss": 2.3, "test_accuracy": 0.1,
                "seconds": 0.1}]
    summary = finish_run(cfg, trained, history, run_dir)
    assert summary["finalize_max_abs_diff"] < 1e-3
    model, meta, _ = load_run(run_dir)
    assert models.count_params(model) == summary["params_deploy"]
    if cfg.compression.kind == "cheap":
        assert meta["spec"]["kwargs"]["block"] == "G(2)"
        assert summary["params_train"] == summary["params_deploy"]
    else:
        assert summary["params_train"] != summary["params_deploy"]
    for name in (*RUN_FILES, *PLOTS):
        assert (run_dir / name).is_file(), name
