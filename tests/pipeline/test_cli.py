"""The ``compactfl`` CLI: usage errors are one line with exit 2; inspect prints the real counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import models
from pipeline.cli import main, parse_slice

REPO = Path(__file__).resolve().parents[2]


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("compactfl: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_key_in_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: smallnet3\ntrain:\n  learning_rate: 0.1\n")
    err = _one_line_exit_2(["run", str(bad)], capsys)
    assert "train.learning_rate" in err and "unknown key" in err


def test_wrong_type_override(capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(["run", "--set", "train.batch_size=big"], capsys)
    assert "train.batch_size" in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(["run", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml" in err


def test_missing_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(["run", "--set", f"data.root={tmp_path / 'no-data'}", "--set", f"output={tmp_path}"],
                           capsys)
    assert "data.root" in err and "no-data" in err and "cifar10.py" in err
    assert not (tmp_path / "demo").exists(), "a usage error must not create a run dir"


def test_data_root_without_cifar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    err = _one_line_exit_2(["run", "--set", f"data.root={tmp_path / 'empty'}", "--set", f"output={tmp_path}"],
                           capsys)
    assert "data.root" in err and "cifar-10-batches-py" in err


def test_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(["run", "--set", "model.name=resnet9000", "--set", f"output={tmp_path}"], capsys)
    assert "resnet9000" in err and "known models" in err


def test_compression_that_does_not_fit_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(["run", "--set", "model.name=smallnet3", "--set", f"output={tmp_path}"], capsys)
    assert err.startswith("compactfl: compression:") and "ck" in err  # CK needs kernels > 3


def test_missing_teacher_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(["run", "--set", f"teacher={{checkpoint: {tmp_path / 't.safetensors'}}}",
                            "--set", "distill={kind: kd}", "--set", f"output={tmp_path}"], capsys)
    assert "teacher.checkpoint" in err


def test_console_script_exit_code_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--set", "model.name=nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr


def test_inspect_expand_prints_compact_expanded_contracted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "smallnet7", "--expand", "ck", "--rate", "4"]) == 0
    out = capsys.readouterr().out
    net = models.build("smallnet7")
    exp = models.expand(net, "ck", rate=4, mode="explicit")
    for m in (net, exp):
        assert f"{models.count_params(m):,}" in out
        assert f"{models.count_macs(m):,}" in out
    assert "contracted (deploy-time)" in out


def test_inspect_csg_and_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "resnet20", "--csg", "16x16x3x3", "--code-size", "128"]) == 0
    out = capsys.readouterr().out
    csg = models.csg_compress(models.build("resnet20"), slice_shape=(16, 16, 3, 3), code_size=128)
    assert f"{models.count_params(csg):,}" in out and "materialized" in out
    assert main(["inspect", "wrn-16-2", "--block", "B(2)"]) == 0
    out = capsys.readouterr().out
    cheap = models.cheapen(models.build("wrn-16-2"), block="B(2)")
    assert f"{models.count_params(cheap, include_buffers=True):,}" in out


def test_inspect_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_exit_2(["inspect", "smallnet7", "--expand", "ck"], capsys)
    _one_line_exit_2(["inspect", "resnet20", "--csg", "16,16,3"], capsys)
    _one_line_exit_2(["inspect", "vgg99"], capsys)
    assert parse_slice("12,12,3,3") == (12, 12, 3, 3)


def test_report_of_a_non_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(["report", str(tmp_path)], capsys)
    assert "metrics.json" in err


# ------------------------------------------------------------------ mistakes that used to print tracebacks
@pytest.mark.parametrize(("argv", "expected"), [
    (["inspect", "smallnet7", "--block", "G(4)"], "--block: cannot cheapen SmallNet"),
    (["inspect", "smallnet7", "--image-size", "64"], "--image-size 64: smallnet7 (compact) cannot run on 64x64"),
    (["inspect", "smallnet7", "--image-size", "0"], "--image-size: expected an integer >= 1, got 0"),
    (["inspect", "smallnet7", "--expand", "ck", "--rate", "-1"], "--expand/--rate: expansion rate must be"),
    (["inspect", "smallnet7", "--expand", "ck", "--rate", "four"], "--rate: invalid float value: 'four'"),
    (["inspect", "resnet20", "--csg", "16,16,3,3", "--code-size", "0"], "--code-size: expected an integer >= 1"),
    (["inspect", "smallnet7", "--csg", "16,16,3,3", "--code-size", "8"], "--csg/--code-size: slice shape"),
    (["inspect", "smallnet7", "--expand", "zz"], "invalid choice: 'zz'"),
    (["export", "/no/such/run", "--onnx"], "not a finished run dir"),
])
def test_cli_mistakes_are_one_line_and_exit_2(argv: list[str], expected: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(argv, capsys)
    assert expected in err, err


def test_export_without_the_onnx_extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail like a missing package
    err = _one_line_exit_2(["export", str(tmp_path), "--onnx"], capsys)
    assert "ONNX extras (missing onnxscript)" in err and "compactfl[onnx]" in err


def test_too_few_replies_in_a_flower_run_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The Flower engine re-raises the ServerApp's TooFewReplies; the CLI prints one line and exits 2.

    The simulation runtime is replaced by the in-process LocalGrid (no Ray) with one client that raises.
    """
    import flwr.simulation
    from flwr.app import Context, RecordDict

    from server.local_grid import LocalGrid
    from tests.fault_injection import faulty_client_app

    def fake_simulation(*, server_app, client_app, num_supernodes, backend_config) -> None:
        grid = LocalGrid(faulty_client_app({0: "raise"}), num_supernodes)
        server_app(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_simulation)
    sets = ["model.name=smallnet3", "compression={kind: none}", f"output={tmp_path}", "data.train_limit=64",
            "data.test_limit=32", "train.max_batches=1", "train.batch_size=32",
            "engine={kind: flower, clients: 2, rounds: 1, min_train_nodes: 2}"]
    assert main(["run", "--quiet", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip()  # Flower's own log lines come first; the error is the last line
    assert "TooFewReplies" not in err  # no traceback of the exception
    last = err.splitlines()[-1]
    assert last.startswith("compactfl: round 1: only 1 valid replies") and "min_train_nodes=2" in last


def test_round_failed_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import pipeline.engines as engines
    from server.loop import RoundFailed

    def fail(cfg, run_dir):
        raise RoundFailed("round 1: the strategy produced no global model")

    monkeypatch.setattr(engines, "run_engine", fail)
    sets = ["model.name=smallnet3", "compression={kind: none}", f"output={tmp_path}", "engine={kind: flower}"]
    err = _one_line_exit_2(["run", "--quiet", *[a for s in sets for a in ("--set", s)]], capsys)
    assert err == "compactfl: round 1: the strategy produced no global model"
