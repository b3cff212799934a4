"""What a SuperNode reads from its OWN node config, and the trust boundary it draws around the server's message.

A node is **deployed** when its node config holds ``data-dir`` (``flower-supernode --node-config
'partition-id=0 num-partitions=3 data-dir="/srv/node-0"'``, or a node-config TOML file). Then every file the
node reads comes from its node config, never from a path inside the server's message:

- ``data-dir``: the folder ``compactfl partition`` wrote for this node (its training partition + test shard);
- ``teacher``: a teacher checkpoint (``model.safetensors`` with ``model.json`` beside it), needed only when
  the run distils;
- ``generator``: a CSG generator file, needed only when the run shares one (``compression.generator``);
- ``state-dir``: where the node keeps its own state across rounds (error-feedback residuals, the global model
  of the delta downlink, ExpandNet factors), one ``run-<key>`` folder per run (default:
  ``data-dir``/nodes/node-PID).

The server's ``data.root``, ``teacher.checkpoint`` (or ``teacher.model``: a deployed node never trains a
teacher into a server-chosen folder) and ``compression.generator`` are replaced by these; a missing key or
file is a one-line ValueError, which Flower returns to the server as an error reply that the server logs. Without
``data-dir`` the node is a **simulation** node (one trusted machine: Flower's simulation sets only
``partition-id``/``num-partitions``) and keeps the run config's paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, TeacherConfig
from pipeline.data.node_data import MANIFEST, is_node_folder

DATA_DIR, TEACHER, GENERATOR, STATE_DIR = "data-dir", "teacher", "generator", "state-dir"


@dataclass(frozen=True)
class NodeSettings:
    """This node's own settings: its partition and, in deployment, the files it may read."""

    partition_id: int
    num_partitions: int
    data_dir: Path | None = None
    teacher: Path | None = None
    generator: Path | None = None
    state_dir: Path | None = None

    @property
    def deployed(self) -> bool:
        """True on a real SuperNode (its node config names ``data-dir``); False in simulation."""
        return self.data_dir is not None


def _path(node_config: dict[str, Any], key: str) -> Path | None:
    value = node_config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"node config {key!r} must be a non-empty quoted path string, got {value!r}")
    return Path(value).expanduser()


def read_node_settings(node_config: dict[str, Any]) -> NodeSettings:
    """Parse a Flower node config; a clear one-line error when the partition keys are missing or wrong."""
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(f"node config lacks {exc.args[0]!r}: start the SuperNode with "
                         "--node-config 'partition-id=I num-partitions=N data-dir=\"/path/node-I\"'") from None
    except (TypeError, ValueError):
        raise ValueError("node config partition-id and num-partitions must be integers, got "
                         f"{node_config.get('partition-id')!r} and {node_config.get('num-partitions')!r}") from None
    if not 0 <= pid < n:
        raise ValueError(f"node config partition-id={pid} is outside 0..{n - 1} (num-partitions={n})")
    settings = NodeSettings(pid, n, _path(node_config, DATA_DIR), _path(node_config, TEACHER),
                            _path(node_config, GENERATOR), _path(node_config, STATE_DIR))
    if not settings.deployed and (settings.teacher or settings.generator or settings.state_dir):
        raise ValueError("node config names teacher/generator files but no 'data-dir': a deployed node takes "
                         "all its files from its node config, so give it data-dir too")
    return settings


def _need_file(path: Path | None, key: str, why: str) -> Path:
    if path is None:
        raise ValueError(f"node config lacks {key!r}: {why}; start the SuperNode with --node-config '{key}=\"PATH\"'")
    if not path.exists():
        raise ValueError(f"node config {key!r}: {str(path)!r} does not exist on this node")
    return path


def node_run_config(cfg: RunConfig, node: NodeSettings) -> RunConfig:
    """The config this node trains under: ``cfg`` itself in simulation; in deployment, ``cfg`` with every
    server-supplied path replaced by the node's own files (see the module docstring)."""
    if not node.deployed:
        return cfg
    data_dir = _need_file(node.data_dir, DATA_DIR, "a deployed node reads only its own data folder")
    if not is_node_folder(data_dir):
        raise ValueError(f"node config {DATA_DIR!r}: {str(data_dir)!r} holds no {MANIFEST} (write this node's "
                         "folder with: compactfl partition CONFIG --out DIR)")
    update: dict[str, Any] = {"data": cfg.data.model_copy(update={"root": data_dir})}
    if cfg.teacher is not None and cfg.distill.kind != "none":
        checkpoint = _need_file(node.teacher, TEACHER, "this run distils from a teacher")
        update["teacher"] = TeacherConfig(checkpoint=checkpoint, cache_logits=cfg.teacher.cache_logits)
    if cfg.compression.kind == "csg" and cfg.compression.generator is not None:
        generator = _need_file(node.generator, GENERATOR, "this run shares a CSG generator file")
        update["compression"] = cfg.compression.model_copy(update={"generator": generator})
    return cfg.model_copy(update=update)


def node_state_folder(cfg: RunConfig, node: NodeSettings, run_key: str) -> Path:
    """Where this node keeps run ``run_key``'s state across rounds and resumes: ``run-<key>`` inside
    ``state-dir`` (or a folder under ``data-dir``) in deployment, inside ``<run dir>/nodes/node-<pid>`` in
    simulation (one trusted machine). The key is checked (hex only) before it becomes part of a path."""
    from pipeline.transport.node_store import node_state_dir, run_state_dir

    if node.data_dir is not None:
        return run_state_dir(node.state_dir or node_state_dir(node.data_dir, node.partition_id), run_key)
    return run_state_dir(node_state_dir(cfg.run_dir, node.partition_id), run_key)
