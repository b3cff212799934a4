"""A real Flower deployment on 127.0.0.1: TLS, SuperNode authentication, node-local data, ``flwr run``.

What README's "Deployment" section tells users to do on real machines, step by step, with throwaway
certificates and keys made here, free ports, ``FLWR_HOME`` in a tmp dir, and every process stopped by its
id (its process group and every descendant) in a finalizer, also when the test fails:

1. a CA, a SuperLink certificate for 127.0.0.1 signed by it, and one EC P-384 key pair per SuperNode;
2. ``compactfl partition`` writes each node's data folder;
3. ``flower-superlink --enable-supernode-auth`` with the certificate;
4. ``$FLWR_HOME/config.toml`` names the SuperLink connection; ``flwr supernode register`` adds three public keys;
5. three ``flower-supernode`` processes, each with its own key and node config (partition + ``data-dir``);
   a fourth with an unregistered key is refused;
6. ``flwr run . deployment --stream`` with a tiny run config; the ServerApp writes the run dir under the
   ``output`` run-config key. The final weights equal the in-process simulation's of the same config.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from pipeline.cli import main as cli_main
from pipeline.config import config_from_dict
from pipeline.data.node_data import node_folder

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLIENTS = 3
# flwr logs "Exit Code: 305" (SUPERNODE_CONNECTION_ERROR) but its flwr_exit ends every error with status 1
REFUSED_LOG = ("Exit Code: 305", "Failed to activate SuperNode")


# ------------------------------------------------------------------------------------ keys, certificates
def make_tls(folder: Path) -> dict[str, Path]:
    """A CA and a SuperLink certificate for 127.0.0.1/localhost signed by it (PEM files), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_cert = cert("compactfl test CA", ca_key, "compactfl test CA", ca_key, ca=True)
    server_cert = cert("127.0.0.1", server_key, "compactfl test CA", ca_key, ca=False)
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ processes
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Processes:
    """Starts commands in their own process groups, logging to files; ``stop_all`` ends each one by its id."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.procs = folder, env, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        """SIGTERM, then SIGKILL, to each started process, its process group (a SuperNode's SuperExec lives on
        there after the SuperNode exits) and every descendant (the SuperLink's SuperExec has its own session)."""
        for proc in self.procs.values():
            pids = [proc.pid, *descendants(proc.pid)]  # flower-superexec, flwr-serverapp, flwr-clientapp
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for kill, target in [(os.killpg, proc.pid), *((os.kill, pid) for pid in pids)]:
                    try:
                        kill(target, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and
                                                          "Z" not in _state(p) for p in pids):
                    time.sleep(0.1)
            proc.wait(timeout=5)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.fixture
def procs(tmp_path: Path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]), "OMP_NUM_THREADS": "1"}
    (tmp_path / "flwr").mkdir()
    (tmp_path / "logs").mkdir()
    manager = Processes(tmp_path / "logs", env)
    yield manager
    manager.stop_all()


def wait_for(predicate, timeout: float, what: str, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; {name}.log:\n{procs.log(name)[-3000:]}")


def run_cli(procs: Processes, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=procs.env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------------------- test
def tiny_config(out: Path) -> dict:
    return {"name": "deployed", "seed": 7, "device": "cpu", "output": str(out),
            "data": {"train_limit": 192, "test_limit": 60, "augment": True, "partition": {"kind": "iid"}},
            "model": {"name": "smallnet3"},
            "engine": {"kind": "flower", "rounds": 2, "clients": CLIENTS, "min_train_nodes": CLIENTS,
                       "round_timeout": 90},
            "train": {"batch_size": 32, "lr": 0.05, "max_batches": 2, "eval_batch_size": 64}}


def test_tls_authenticated_deployment_trains_on_node_local_data(tmp_path: Path, procs: Processes) -> None:
    t0 = time.monotonic()
    tls = make_tls(tmp_path)
    keys = [make_node_key(tmp_path, f"node{i}") for i in range(CLIENTS + 1)]  # the last is never registered
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "runs")))
    assert cli_main(["partition", str(config), "--out", str(tmp_path / "nodes")]) == 0

    link = free_port()
    procs.start("superlink", str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tls["ca"]),
                "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth",
                "--host", "127.0.0.1", "--port", str(link), "--disable-runtime-dependency-installation")
    wait_for(lambda: "Uvicorn running on https://" in procs.log("superlink"), 60, "the SuperLink", procs,
             "superlink")
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "127.0.0.1:{link}"\n'
        f'root-certificates = "{tls["ca"]}"\n')
    for _, public in keys[:CLIENTS]:
        done = run_cli(procs, "supernode", "register", str(public), "deployment", "--format", "json")
        assert done.returncode == 0 and '"success": true' in done.stdout, done.stdout + done.stderr

    for i, (private, _) in enumerate(keys):
        pid = i % CLIENTS
        node = f'partition-id={pid} num-partitions={CLIENTS} data-dir="{node_folder(tmp_path / "nodes", pid)}"'
        procs.start(f"supernode{i}", str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link}",
                    "--root-certificates", str(tls["ca"]), "--auth-supernode-private-key", str(private),
                    "--node-config", node, "--host", "127.0.0.1", "--port", str(free_port()),
                    "--max-retries", "1", "--max-wait-time", "20")
    for i in range(CLIENTS):
        wait_for(lambda i=i: "SuperNode ID:" in procs.log(f"supernode{i}"), 60, f"SuperNode {i}", procs,
                 f"supernode{i}")

    started = time.monotonic()
    print(f"\nlink + 3 nodes up after {started - t0:.1f} s")
    run = run_cli(procs, "run", ".", "deployment", "--stream", "-c", f'config="{config}"', "-c",
                  f'output="{tmp_path / "runs"}"', timeout=240)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    run_dir = tmp_path / "runs" / "deployed"  # the ServerApp writes <output>/<name>
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(r["round"], r["replies_ok"], r["replies_failed"]) for r in metrics["history"]] == [(1, 3, 0), (2, 3, 0)], \
        procs.log("superlink")[-3000:]
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "checkpoints" / "round-0002.safetensors").is_file()
    assert metrics["summary"]["bytes_up"] > 0 and metrics["summary"]["test_samples"] == 60

    refused = procs.procs[f"supernode{CLIENTS}"]
    assert refused.wait(timeout=30) == 1, procs.log(f"supernode{CLIENTS}")[-2000:]
    assert all(text in procs.log(f"supernode{CLIENTS}") for text in REFUSED_LOG)

    # the same config simulated in-process trains on the same samples: the same final weights
    from clients.app import app as client_app
    from server.local_grid import LocalGrid
    from server.runner import run_server

    sim = config_from_dict({**tiny_config(tmp_path / "sim")})
    run_server(LocalGrid(client_app, CLIENTS), sim, sim.run_dir)
    a = safetensors.torch.load_file(str(run_dir / "model.safetensors"))
    b = safetensors.torch.load_file(str(sim.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    print(f"flwr run {seconds:.1f} s; total {time.monotonic() - t0:.1f} s")
