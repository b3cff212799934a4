"""The Flower ServerApp (Message API) that ``flwr run .`` loads (``[tool.flwr.app.components]``).

Its run config (``[tool.flwr.app.config]`` in pyproject.toml, overridable with ``flwr run . -c 'k=v'``):
- ``config``: a pipeline YAML; a relative path is looked up in the app directory (the repo, or the
  installed FAB, which carries ``configs/*.yaml``), then in the working directory;
- ``num-server-rounds``: overrides ``engine.rounds`` when > 0;
- ``overrides``: space-separated ``key.path=value`` items, as ``compactfl run --set``;
- ``output``: overrides ``output`` (where run dirs go) when not empty.
The pipeline's flower engine runs the same :func:`server.runner.run_server` with a config object.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pipeline.config import ConfigError, RunConfig, load_config
from server.runner import run_server

APP_DIR = Path(__file__).resolve().parent.parent

app = ServerApp()


def resolve_config_path(path: str) -> Path:
    """A run-config ``config`` path: absolute, else relative to the app directory, else to the cwd."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for base in (APP_DIR, Path.cwd()):
        if (base / p).is_file():
            return base / p
    raise ConfigError(f"config error: run-config 'config' = {path!r} not found in {APP_DIR} or {Path.cwd()}")


def config_from_run_config(run_config: dict) -> RunConfig:
    """The RunConfig described by a Flower run config (see the module docstring)."""
    if "config" not in run_config or not str(run_config["config"]).strip():
        raise ConfigError("config error: run-config key 'config' (path to a pipeline YAML) is required")
    overrides = shlex.split(str(run_config.get("overrides", "")))
    rounds = int(run_config.get("num-server-rounds", 0) or 0)
    if rounds > 0:
        overrides.append(f"engine.rounds={rounds}")
    output = str(run_config.get("output", "") or "")
    if output:
        overrides.append(f"output={output}")
    cfg = load_config(resolve_config_path(str(run_config["config"])), overrides)
    if cfg.engine.kind != "flower":
        raise ConfigError(f"config error: engine.kind: the Flower app needs 'flower', got {cfg.engine.kind!r}")
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Resolve the run config, prepare the run dir and run the federated training."""
    from pipeline.stages import prepare_run_dir

    cfg = config_from_run_config(dict(context.run_config))
    run_server(grid, cfg, prepare_run_dir(cfg))
