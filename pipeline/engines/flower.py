"""The flower engine: run the project's ServerApp/ClientApp in Flower's simulation runtime (Ray backend).

``run_flower(cfg, run_dir)`` wraps :func:`server.runner.run_server` (the body of ``server.app``) in a
ServerApp bound to ``cfg`` and runs it with ``clients.app.app`` via ``flwr.simulation.run_simulation``,
so ``compactfl run <flower config>`` and ``flwr run .`` execute the same code. Ray is started fresh and
local (``address="local"``): a stale ``/tmp/ray/ray_current_cluster`` or another user's cluster is never
joined, and the Ray instance is shut down afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import RunConfig

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


def backend_config(cfg: RunConfig, ray_cpus: int | None = None) -> dict[str, Any]:
    """Ray backend settings: per-client resources and a fresh local Ray (all CPUs unless ``ray_cpus``)."""
    eng = cfg.engine
    cpus = max(int(ray_cpus or len(os.sched_getaffinity(0)) or 1), int(eng.client_cpus + 0.999))
    return {
        "client_resources": {"num_cpus": eng.client_cpus, "num_gpus": eng.client_gpus},
        "init_args": {"address": "local", "num_cpus": cpus, "include_dashboard": False,
                      "logging_level": "ERROR", "log_to_driver": True},
    }


def run_flower(cfg: RunConfig, run_dir: Path, *, ray_cpus: int | None = None,
               client_app: ClientApp | None = None) -> dict[str, Any]:
    """Run the federated training of ``cfg`` in a Flower simulation; returns the run summary.

    ``ray_cpus`` caps the CPUs of the local Ray instance (default: all CPUs of this process); ``client_app``
    defaults to ``clients.app.app`` (tests pass a wrapper that corrupts replies). A resume is checked against
    the latest round checkpoint before Ray starts; an error of the ServerApp (e.g. ``TooFewReplies``) is
    re-raised here as it was raised.
    """
    import ray
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from pipeline.checkpoint import latest_round_checkpoint
    from server.runner import CHECKPOINT_DIR, run_server

    if client_app is None:
        from clients.app import app as client_app
    if cfg.engine.kind != "flower":
        raise ValueError(f"engine.kind must be 'flower' for run_flower, got {cfg.engine.kind!r}")
    if cfg.resume:
        latest_round_checkpoint(Path(run_dir) / CHECKPOINT_DIR, cfg)  # refuses a changed config, names the key
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            result["summary"] = run_server(grid, cfg, Path(run_dir))
        except Exception as exc:  # noqa: BLE001 - re-raised after the simulation, unwrapped
            result["error"] = exc

    env_address = os.environ.pop("RAY_ADDRESS", None)  # never join an external cluster from the simulation
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.engine.clients,
                       backend_config=backend_config(cfg, ray_cpus))
    finally:
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address
        if ray.is_initialized():
            ray.shutdown()
    if "error" in result:
        raise result["error"]
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a result (did Ray start? a stale "
                           "/tmp/ray/ray_current_cluster can make it hang: see README 'Flower')")
    return result["summary"]
