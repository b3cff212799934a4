"""Ray engine pieces that need no running Ray: cluster YAML validation, launch-script helpers, address choice."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clients.ray_worker import CHECKPOINT_DIR, epoch_seed, progress_line
from pipeline.checkpoint import ResumeError, save_epoch_checkpoint
from pipeline.config import config_from_dict
from pipeline.engines.ray import (
    absolute_config,
    address_reachable,
    check_ray_resume,
    comm_totals,
    latest_ray_checkpoint,
    resolve_address,
    storage_dir,
)
from tests.fault_injection import fault_rank, wait_for_committed_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_rays_own_validation() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert raw["provider"]["type"] == "local" and raw["provider"]["head_ip"]
    assert raw["file_mounts"] == {"~/compactfl": "."} and raw["setup_commands"]
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` does before launching anything
    broken = copy.deepcopy(raw)
    broken["provider"]["head_ip"] = None
    with pytest.raises(jsonschema.ValidationError, match="head_ip"):
        validate_config(prepare_config(broken))


def test_launch_script_runs_as_a_plain_script_from_anywhere(tmp_path: Path) -> None:
    # Copied alone into another folder (what `ray submit` does), with the project found via COMPACTFL_HOME.
    script = tmp_path / "launch.py"
    script.write_text((REPO / "pipeline" / "launch.py").read_text())
    env = {"PATH": "/usr/bin:/bin", "COMPACTFL_HOME": str(REPO), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script), "configs/nope.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # usage error from `compactfl run`: the package imported fine
    assert "nope.yaml" in done.stderr and "does not exist" in done.stderr


def test_launch_resolves_relative_configs_against_the_project(tmp_path: Path, monkeypatch) -> None:
    from pipeline.launch import resolve_config

    monkeypatch.chdir(tmp_path)
    assert resolve_config("configs/demo.yaml", REPO) == str(REPO / "configs" / "demo.yaml")
    assert resolve_config("missing.yaml", REPO) == "missing.yaml"
    (tmp_path / "here.yaml").write_text("seed: 1\n")
    assert resolve_config("here.yaml", REPO) == "here.yaml"


def test_address_choice_skips_a_stale_cluster_file(tmp_path: Path, monkeypatch) -> None:
    import ray._common.utils as ray_utils

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # closed again below: nothing listens there
    stale = tmp_path / "ray_current_cluster"
    stale.write_text(dead)
    monkeypatch.setattr(ray_utils, "get_ray_address_file", lambda _temp: str(stale))
    cfg = config_from_dict({"engine": {"kind": "ray"}})
    assert not address_reachable(dead)
    assert resolve_address(cfg) == "local"
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        stale.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert resolve_address(cfg) == stale.read_text()
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert resolve_address(cfg) == "10.1.2.3:6379"
    assert resolve_address(config_from_dict({"engine": {"kind": "ray", "address": "auto"}})) == "auto"


def test_paths_become_absolute_for_workers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"name": "r", "output": "runs", "data": {"root": "data/c10"},
                            "engine": {"kind": "ray"}})
    abs_cfg = absolute_config(cfg)
    assert abs_cfg.output == tmp_path / "runs" and abs_cfg.data.root == tmp_path / "data" / "c10"
    assert storage_dir(abs_cfg, abs_cfg.run_dir) == tmp_path / "runs" / "r" / "ray"


def test_worker_helpers() -> None:
    assert fault_rank(2) == 1 and fault_rank(1) == 0
    seeds = {epoch_seed(0, r, e) for r in range(2) for e in range(3)}
    assert len(seeds) == 6 and epoch_seed(0, 1, 2) == epoch_seed(0, 1, 2)
    hist = [{"bytes_allreduce": 100, "steps": 2, "comm": "fp16", "workers": 2},
            {"bytes_allreduce": 60, "steps": 2, "comm": "fp16", "workers": 2}]
    assert comm_totals(hist) == {"bytes_allreduce": 160, "allreduce_steps": 4, "bytes_per_step": 40.0,
                                 "comm": "fp16", "workers": 2}
    rec = {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.5, "test_accuracy": 0.4, "train_throughput": 99.0,
           "bytes_allreduce": 2_000_000, "bytes_per_step": 1000.0, "steps": 2000, "comm": "none"}
    line = progress_line(rec, 3)
    assert line.startswith("epoch 1/3") and "99 samples/s" in line and "2.000 MB/rank" in line


def test_fault_injection_waits_for_the_committed_checkpoint(tmp_path: Path) -> None:
    snap = tmp_path / "checkpoint_manager_snapshot.json"
    assert not wait_for_committed_checkpoint(tmp_path, "epoch_0001", timeout=0.3)
    snap.write_text('{"latest_checkpoint_result": {"checkpoint_dir_name": "epoch_0001"}}')
    assert wait_for_committed_checkpoint(tmp_path, "epoch_0001", timeout=1)


def test_ray_resume_refuses_a_changed_config_before_any_worker_starts(tmp_path: Path) -> None:
    """The driver reads the newest epoch checkpoint a worker wrote and names the first key that differs."""
    import models
    from pipeline.train import build_optimizer

    raw = {"name": "r", "output": str(tmp_path), "model": {"name": "smallnet3"}, "engine": {"kind": "ray"},
           "train": {"epochs": 2, "schedule": "cosine"}}
    cfg = config_from_dict(raw)
    run_storage = tmp_path / "ray" / "r"
    assert latest_ray_checkpoint(run_storage) is None
    check_ray_resume(cfg, run_storage)  # nothing to resume: a fresh run
    model = models.build("smallnet3")
    for epoch in (1, 2):
        folder = run_storage / CHECKPOINT_DIR.format(epoch=epoch)
        save_epoch_checkpoint(folder, model, build_optimizer(model, cfg.train), epoch, [], cfg)
    assert latest_ray_checkpoint(run_storage).name == "epoch_0002"
    check_ray_resume(config_from_dict({**raw, "train": {"epochs": 4, "schedule": "cosine"},
                                       "engine": {"kind": "ray", "max_failures": 3}}), run_storage)
    with pytest.raises(ResumeError, match=r"different train\.lr \(0\.05, now 0\.1\)"):
        check_ray_resume(config_from_dict({**raw, "train": {"epochs": 2, "schedule": "cosine", "lr": 0.1}}),
                         run_storage)
    with pytest.raises(ResumeError, match=r"engine\.workers .*delete .*ray/r to start over"):
        check_ray_resume(config_from_dict({**raw, "engine": {"kind": "ray", "workers": 3}}), run_storage)
