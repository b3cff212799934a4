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
from typing import Any

from pipeline.config import RunConfig


def backend_config(cfg: RunConfig, ray_cpus: int | None = None) -> dict[str, Any]:
    """Ray backend settings: per-client resources and a fresh local Ray (all CPUs unless ``ray_cpus``)."""
    eng = cfg.engine
    cpus = max(int(ray_cpus or len(os.sched_getaffinity(0)) or 1), int(eng.client_cpus + 0.999))
    return {
        "client_resources": {"num_cpus": eng.client_cpus, "num_gpus": eng.client_gpus},
        "init_args": {"address": "local", "num_cpus": cpus, "include_dashboard": False,
                      "logging_level": "ERROR", "log_to_driver": True},
    }


def run_flower(cfg: RunConfig, run_dir: Path, *, ray_cpus: int | None = None) -> dict[str, Any]:
    """Run the federated training of ``cfg`` in a Flower simulation; returns the run summary.

    ``ray_cpus`` caps the CPUs of the local Ray instance (default: all CPUs of this process).
    """
    import ray
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.runner import run_server

    if cfg.engine.kind != "flower":
        raise ValueError(f"engine.kind must be 'flower' for run_flower, got {cfg.engine.kind!r}")
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result["summary"] = run_server(grid, cfg, Path(run_dir))

    env_address = os.environ.pop("RAY_ADDRESS", None)  # never join an external cluster from the simulation
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.engine.clients,
                       backend_config=backend_config(cfg, ray_cpus))
    finally:
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address
        if ray.is_initialized():
            ray.shutdown()
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without a result (did Ray start? a stale "
                           "/tmp/ray/ray_current_cluster can make it hang: see README 'Flower')")
    return result["summary"]
