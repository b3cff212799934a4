"""Ray engine end to end, always in subprocesses (never ``ray.init`` inside pytest, so Flower's tests do not
collide): dense / CSG / expanded runs, a killed worker that is restarted, a resumed run, then the two launch
paths users take (``ray job submit`` to a ``ray start --head`` on loopback, and ``ray up`` + ``ray submit``
over SSH to 127.0.0.1). Every test stops what it started by process id.

Run this file as a script (``python tests/engines/test_ray_e2e.py OUT_DIR``) to execute the engine scenarios alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
RAY = str(Path(PYTHON).parent / "ray")
pytestmark = pytest.mark.slow

DIE_BEFORE_EPOCH = {"expand": 2}  # scenario -> epoch before which rank 1 kills itself once (test-only wrapper)
TINY = {"data": {"root": None, "train_limit": 128, "test_limit": 100, "augment": True},
        "train": {"batch_size": 64, "eval_batch_size": 100, "lr": 0.02, "epochs": 1}}
CSG = {"kind": "csg", "slice_shape": [16, 16, 3, 3], "code_size": 16}


def scenario_configs(out: Path) -> dict[str, dict[str, Any]]:
    """Raw configs of the engine scenarios (tiny: embedded subset, 128 training images, 2 CPU workers)."""
    def cfg(name: str, model: str, compression: dict | None = None, epochs: int = 1, **engine: Any) -> dict:
        return {**TINY, "name": name, "seed": 0, "output": str(out), "model": {"name": model},
                "compression": compression or {"kind": "none"},
                "engine": {"kind": "ray", "workers": 2, "max_failures": 1, **engine},
                "train": {**TINY["train"], "epochs": epochs}, "tracking": {"mlflow": {"enabled": False}}}

    return {
        "dense": cfg("dense", "resnet20"),
        "csg": cfg("csg", "resnet20", CSG),
        # KD from a teacher the driver trains once (workers load its saved copy); rank 1 dies once before
        # epoch 2 (DIE_BEFORE_EPOCH) and the restarted attempt resumes from the epoch-1 checkpoint
        "expand": {**cfg("expand", "smallnet7", {"kind": "expand", "strategy": "ck", "rate": 4}, epochs=2),
                   "transport": {"comm": "fp16"},
                   "teacher": {"model": {"name": "smallnet3"}, "train": {"epochs": 1, "max_batches": 1}},
                   "distill": {"kind": "kd", "T": 4.0, "alpha": 0.9},
                   "tracking": {"mlflow": {"enabled": True}}},  # the driver logs to <out>/mlflow.db
        "resume": cfg("dense", "resnet20", epochs=2),  # same name + storage as "dense": continues it
    }


def run_scenarios(out: Path) -> dict[str, Any]:
    """Run every scenario on one private local Ray (one start-up for all); returns summaries + histories."""
    import ray

    from pipeline.config import config_from_dict
    from pipeline.engines.ray import run_ray
    from pipeline.stages import prepare_run_dir
    from tests.fault_injection import dying_train_func

    temp = tempfile.mkdtemp(prefix="cfr", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    results = {}
    try:
        for key, raw in scenario_configs(out).items():
            cfg = config_from_dict(raw)
            worker = dying_train_func(DIE_BEFORE_EPOCH[key]) if key in DIE_BEFORE_EPOCH else None
            summary = run_ray(cfg, prepare_run_dir(cfg), train_func=worker)
            metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
            results[key] = {"summary": summary, "history": metrics["history"]}
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------- process helpers
def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def pids_matching(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a unique temp path of one test), plus all their
    descendants (Ray workers rename themselves to ``ray::...`` and lose the marker, but stay raylet children)."""
    me = os.getpid()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.add(int(entry.name))
    parents = _ppids()
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in found and pid not in found and pid != me}
        found |= more
        grew = bool(more)
    return sorted(found)


def kill_pids(pids: list[int]) -> None:
    """SIGTERM, a short grace, then SIGKILL, each by process id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.1)


def run_checked(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None,
                cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill its process group and fail with its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} timed out after {timeout}s:\n{out[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:4])} exited {proc.returncode}:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for Ray CLI subprocesses: venv first on PATH, no inherited RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def assert_run_dir(run_dir: Path) -> dict[str, Any]:
    """The common outputs of every engine exist; returns metrics.json."""
    for name in ("config.yaml", "model.safetensors", "model.json", "metrics.json", "report.md"):
        assert (run_dir / name).is_file(), f"{run_dir} lacks {name}"
    return json.loads((run_dir / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------- scenarios
@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ray_runs")
    result_file = out / "results.json"
    run_checked([PYTHON, str(Path(__file__).resolve()), str(out), str(result_file)], timeout=420,
                env=clean_env(COMPACTFL_TRACKING="on"))
    return {**json.loads(result_file.read_text()), "out": str(out)}


def test_dense_csg_and_expanded_runs_finish_with_compact_models(scenarios: dict[str, Any]) -> None:
    import models

    for key, arch in (("dense", "resnet20"), ("csg", "resnet20"), ("expand", "smallnet7")):
        s = scenarios[key]["summary"]
        assert s["engine"] == "ray" and s["steps"] == len(scenarios[key]["history"])
        plain = models.count_params(models.build(arch, num_classes=10))
        assert s["params_deploy"] == plain, key  # finalised: the plain architecture again
        assert s["finalize_max_abs_diff"] < 1e-3, key
        assert 0.0 <= s["test_accuracy"] <= 1.0 and s["test_samples"] == 100
        rec = scenarios[key]["history"][0]
        assert rec["workers"] == 2 and rec["train_samples"] == 128 and rec["steps"] == 2
    assert scenarios["expand"]["summary"]["params_train"] > scenarios["expand"]["summary"]["params_deploy"]
    assert scenarios["csg"]["summary"]["params_train"] < scenarios["csg"]["summary"]["params_deploy"]


def test_csg_bytes_per_step_shrink_by_the_trainable_parameter_ratio(scenarios: dict[str, Any]) -> None:
    dense, csg = scenarios["dense"], scenarios["csg"]
    byte_ratio = csg["history"][0]["bytes_per_step"] / dense["history"][0]["bytes_per_step"]
    param_ratio = csg["summary"]["params_train"] / dense["summary"]["params_train"]
    assert byte_ratio < 0.5
    assert abs(byte_ratio / param_ratio - 1) < 0.02
    assert dense["summary"]["bytes_allreduce"] == dense["history"][0]["bytes_allreduce"] > 0


def test_compression_hooks_and_distillation_on_workers(scenarios: dict[str, Any]) -> None:
    exp = scenarios["expand"]
    assert exp["summary"]["distill"] == "kd"
    assert exp["history"][0]["comm"] == "fp16"
    # transport.expand_sync: compact (default): the fused factors' gradients travel as the compact dL/dW, dL/db
    assert exp["history"][0]["bytes_per_step"] == exp["summary"]["params_deploy"] * 2


def test_killed_worker_is_restarted_and_the_run_completes(scenarios: dict[str, Any]) -> None:
    hist = scenarios["expand"]["history"]
    assert [r["epoch"] for r in hist] == [1, 2]
    assert hist[0]["start_epoch"] == 0 and hist[1]["start_epoch"] == 1  # epoch 2 ran in the restarted attempt
    storage = Path(scenarios["expand"]["summary"]["ray_storage"])
    assert (storage / "fault_injected_epoch_2").is_file()


def test_same_run_name_resumes_from_its_latest_checkpoint(scenarios: dict[str, Any]) -> None:
    first, resumed = scenarios["dense"]["history"], scenarios["resume"]["history"]
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[0] == first[0]  # epoch 1 comes from the checkpoint, not retrained
    assert resumed[1]["start_epoch"] == 1


def test_the_driver_logs_the_epoch_history_and_artifacts_to_mlflow(scenarios: dict[str, Any]) -> None:
    """Only the scenario that enables tracking is logged (after a worker restart), from the driver process."""
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(scenarios['out']) / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("compactfl").experiment_id])
    assert [r.info.run_name for r in runs] == ["expand"]
    run, hist = runs[0], scenarios["expand"]["history"]
    assert run.info.status == "FINISHED" and run.data.tags["engine"] == "ray" and run.data.tags["comm"] == "fp16"
    assert run.data.params["engine.workers"] == "2" and run.data.params["distill.kind"] == "kd"
    for key in ("train_loss", "test_accuracy", "bytes_allreduce"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(r["epoch"], pytest.approx(r[key])) for r in hist], key
    cumulative = client.get_metric_history(run.info.run_id, "bytes_allreduce_cumulative")
    assert max(m.value for m in cumulative) == scenarios["expand"]["summary"]["bytes_allreduce"]
    assert {"model.safetensors", "model.json", "report.md"} <= {f.path for f in client.list_artifacts(run.info.run_id)}



# ------------------------------------------------------------------------------------- launch paths
def head_start_args(temp: str, ports: list[int]) -> list[str]:
    """``ray start --head`` on loopback with every port chosen free and a private temp dir (no clash with
    other Ray users of this machine, and no write to the shared /tmp/ray/ray_current_cluster)."""
    gcs, dash, client, agent, agent_grpc, metrics, node_mgr, obj_mgr, renv = ports
    return ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", f"--temp-dir={temp}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
            f"--runtime-env-agent-port={renv}", "--disable-usage-stats"]


def tiny_launch_config(path: Path, name: str) -> Path:
    """A 1-epoch Ray config for the launch paths (embedded data, 2 CPU workers)."""
    import yaml

    raw = {**TINY, "name": name, "seed": 0, "model": {"name": "smallnet7"},
           "engine": {"kind": "ray", "workers": 2, "max_failures": 0},
           "tracking": {"mlflow": {"enabled": False}}}  # ray submit's login shell has no COMPACTFL_TRACKING
    path.write_text(yaml.safe_dump(raw))
    return path


def test_ray_job_submit_to_a_loopback_head(tmp_path: Path) -> None:
    temp = tempfile.mkdtemp(prefix="cfj", dir="/tmp")  # short: Ray's unix sockets live under it
    ports = free_ports(9)
    env = clean_env()
    out = tmp_path / "runs"
    config = tiny_launch_config(tmp_path / "job.yaml", "job_submit")
    try:
        run_checked([RAY, "start", *head_start_args(temp, ports)], timeout=180, env=env)
        assert not (Path("/tmp/ray/ray_current_cluster").is_file()
                    and str(ports[0]) in Path("/tmp/ray/ray_current_cluster").read_text())
        done = run_checked([RAY, "job", "submit", "--address", f"http://127.0.0.1:{ports[1]}", "--working-dir",
                            str(REPO), "--", "python", "pipeline/launch.py", str(config), "--set", f"output={out}",
                            "--set", f"engine.address=127.0.0.1:{ports[0]}"], timeout=300, env=env)
        assert "succeeded" in done.stdout, done.stdout[-3000:]
        metrics = assert_run_dir(out / "job_submit")
        assert metrics["summary"]["engine"] == "ray" and metrics["history"][0]["workers"] == 2
    finally:
        kill_pids(pids_matching(temp))
        shutil.rmtree(temp, ignore_errors=True)
    assert pids_matching(temp) == []


SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


def _ssh_skip_reason() -> str | None:
    if SSHD is None or shutil.which("rsync") is None or shutil.which("ssh") is None:
        return "needs sshd, ssh and rsync (Debian: apt-get install openssh-server openssh-client rsync)"
    if os.geteuid() != 0:
        return "needs root: it runs sshd for a throwaway user"
    return None


def cluster_yaml(path: Path, *, user: str, key: Path, sshd_config: Path, temp: str, ports: list[int],
                 name: str) -> Path:
    """The repository's ray_cluster.yaml pointed at 127.0.0.1 as ``user``; SSH goes through ``sshd -i``
    (inetd mode, a proxy command) so no port is opened; no installs (the project is shipped, launch.py
    finds ~/compactfl); Ray starts with the test's ports and temp dir."""
    import yaml

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    raw.update({
        "cluster_name": name, "max_workers": 0,
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": {"ssh_user": user, "ssh_private_key": str(key),
                 "ssh_proxy_command": f"{SSHD} -i -f {sshd_config}"},
        "file_mounts": {"~/compactfl": str(REPO)},
        "setup_commands": [],
        "head_start_ray_commands": [f"ray start {' '.join(head_start_args(temp, ports))}"],
        "worker_start_ray_commands": [],
    })
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_ray_up_and_ray_submit_over_ssh_to_localhost(tmp_path: Path) -> None:
    reason = _ssh_skip_reason()
    if reason:
        pytest.skip(reason)
    tag = f"cfl{os.getpid() % 100000}"
    base = Path(tempfile.mkdtemp(prefix="cfu", dir="/tmp"))
    home, temp = base / "home", str(base / "r")
    home.mkdir()
    ports = free_ports(9)
    key, host_key = base / "id_ed25519", base / "host_ed25519"
    for k in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
    (home / ".ssh").mkdir()
    shutil.copy(f"{key}.pub", home / ".ssh" / "authorized_keys")
    # `ray submit` runs `bash --login -i -c 'source ~/.bashrc; ... python ~/launch.py'`: venv first on PATH.
    (home / ".bashrc").write_text(f'export PATH="{Path(PYTHON).parent}:$PATH"\n')
    sshd_config = base / "sshd_config"
    sshd_config.write_text(
        f"HostKey {host_key}\nAuthorizedKeysFile {home}/.ssh/authorized_keys\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"PermitRootLogin prohibit-password\nAllowUsers {tag}\nPidFile none\nLogLevel ERROR\n")
    made_privsep = not Path("/run/sshd").exists()
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    # A throwaway login name for uid 0 with its own home: the venv's interpreter lives under /root (0700
    # here), and root's own dotfiles stay untouched. All its processes carry ``base`` in their command line
    # or descend from one that does, so they are found and stopped by pid.
    subprocess.run(["useradd", "-o", "-u", "0", "-g", "0", "-N", "-M", "-d", str(home), "-s", "/bin/bash",
                    "-p", "*", tag], check=True, capture_output=True)
    config = tiny_launch_config(home / "submit.yaml", "ray_submit")
    yaml_path = cluster_yaml(base / "cluster.yaml", user=tag, key=key, sshd_config=sshd_config, temp=temp,
                             ports=ports, name=tag)
    env = clean_env()
    control_dirs = set(Path("/tmp").glob("ray_ssh_*/*"))  # ssh ControlPath dirs the Ray CLI creates
    try:
        run_checked([RAY, "up", "-y", "--no-config-cache", str(yaml_path)], timeout=240, env=env)
        done = run_checked([RAY, "submit", "--no-config-cache", str(yaml_path), str(REPO / "pipeline" / "launch.py"),
                            "--", str(config), "--set", f"output={home}/runs",
                            "--set", f"engine.address=127.0.0.1:{ports[0]}"], timeout=300, env=env)
        assert "run dir:" in done.stdout, done.stdout[-3000:]
        metrics = assert_run_dir(home / "runs" / "ray_submit")
        assert metrics["summary"]["engine"] == "ray" and metrics["history"][0]["workers"] == 2
        assert (home / "compactfl" / "pipeline" / "launch.py").is_file()  # shipped by file_mounts
        assert not (home / "compactfl" / ".venv").exists()  # .gitignore'd paths stay behind
        run_checked([RAY, "down", "-y", str(yaml_path)], timeout=120, env=env)
    finally:
        # `ray down` leaves the local head's processes running; sshd -i proxies and ssh control masters too
        kill_pids(pids_matching(str(base)))
        subprocess.run(["userdel", "-f", tag], check=False, capture_output=True)
        for suffix in (".state", ".lock"):
            Path(f"/tmp/cluster-{tag}{suffix}").unlink(missing_ok=True)
        if made_privsep:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        for d in set(Path("/tmp").glob("ray_ssh_*/*")) - control_dirs:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    assert pids_matching(str(base)) == []
    assert subprocess.run(["id", tag], capture_output=True).returncode != 0  # throwaway user removed


if __name__ == "__main__":
    outdir, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    Path(result_path).write_text(json.dumps(run_scenarios(outdir), default=str))
