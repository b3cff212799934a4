"""The SuperNode trust boundary: a deployed node reads files only from its own node config, never from paths
in the server's message; in simulation the run config's paths stay. In-process (LocalGrid), no Ray."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch

import models
from clients.app import app as client_app
from clients.node_config import node_run_config, node_state_folder, read_node_settings
from pipeline.config import config_from_dict
from pipeline.data.node_data import node_folder, write_node_partitions
from server.local_grid import NODE_ID_BASE, LocalGrid
from server.runner import run_server


def raw_config(tmp_path: Path, **extra) -> dict:
    return {"name": "dep", "seed": 3, "device": "cpu", "output": str(tmp_path / "runs"),
            "data": {"train_limit": 192, "test_limit": 64, "augment": True, "partition": {"kind": "iid"}},
            "model": {"name": "smallnet3"},
            "engine": {"kind": "flower", "rounds": 2, "clients": 3, "min_train_nodes": 1},
            "train": {"batch_size": 32, "lr": 0.05, "max_batches": 2, "eval_batch_size": 64}, **extra}


def test_simulation_nodes_keep_the_run_config_and_partition_keys_are_required(tmp_path: Path) -> None:
    cfg = config_from_dict(raw_config(tmp_path))
    node = read_node_settings({"partition-id": 1, "num-partitions": 3})
    assert not node.deployed and node_run_config(cfg, node) is cfg
    for bad, words in (({"num-partitions": 3}, "lacks 'partition-id'"), ({"partition-id": 3, "num-partitions": 3},
                                                                           "outside 0..2"),
                       ({"partition-id": 0, "num-partitions": 3, "teacher": "/t"}, "no 'data-dir'"),
                       ({"partition-id": 0, "num-partitions": 3, "data-dir": 5}, "quoted path")):
        with pytest.raises(ValueError, match=words):
            read_node_settings(bad)


def test_node_state_lives_in_the_nodes_own_folder_never_a_server_path(tmp_path: Path) -> None:
    cfg = config_from_dict(raw_config(tmp_path))
    key = "5f" * 16  # each run's state has its own folder inside the node's
    sim = read_node_settings({"partition-id": 1, "num-partitions": 3})
    assert node_state_folder(cfg, sim, key) == cfg.run_dir / "nodes" / "node-1" / f"run-{key}"
    own = read_node_settings({"partition-id": 1, "num-partitions": 3, "data-dir": str(tmp_path / "n1"),
                              "state-dir": str(tmp_path / "state")})
    assert node_state_folder(cfg, own, key) == tmp_path / "state" / f"run-{key}"
    default = read_node_settings({"partition-id": 1, "num-partitions": 3, "data-dir": str(tmp_path / "n1")})
    assert node_state_folder(cfg, default, key) == tmp_path / "n1" / "nodes" / "node-1" / f"run-{key}"
    with pytest.raises(ValueError, match="run key must be 32 lowercase hex characters"):
        node_state_folder(cfg, own, "../" + key[3:])
    with pytest.raises(ValueError, match="no 'data-dir'"):
        read_node_settings({"partition-id": 0, "num-partitions": 3, "state-dir": "/s"})


def test_a_deployed_node_replaces_every_server_path_with_its_own(tmp_path: Path) -> None:
    teacher = models.build("smallnet3", num_classes=10)
    (tmp_path / "teacher").mkdir()
    from pipeline.stages import save_model

    save_model(teacher, models.model_spec(teacher), tmp_path / "teacher", {})
    gen_model = models.csg_compress(models.build("smallnet7"), slice_shape=(8, 8, 7, 7), code_size=8)
    models.csg.save_generator(gen_model, tmp_path / "gen.safetensors")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "partition.json").write_text("{}")  # node_run_config only checks it is a node folder
    server_paths = {"teacher": {"checkpoint": "/server/teacher"}, "distill": {"kind": "kd"},
                    "compression": {"kind": "csg", "slice_shape": [8, 8, 7, 7], "code_size": 8,
                                    "generator": "/server/gen.safetensors", "train_generator": False}}
    raw = raw_config(tmp_path, **server_paths)
    raw["data"]["root"] = "/server/data"
    cfg = config_from_dict(raw)
    node_cfg = {"partition-id": 0, "num-partitions": 3, "data-dir": str(tmp_path / "data"),
                "teacher": str(tmp_path / "teacher"), "generator": str(tmp_path / "gen.safetensors")}
    mine = node_run_config(cfg, read_node_settings(node_cfg))
    assert mine.data.root == tmp_path / "data"
    assert mine.teacher.checkpoint == tmp_path / "teacher" and mine.teacher.model is None
    assert mine.compression.generator == tmp_path / "gen.safetensors"
    assert "/server" not in mine.model_dump_json()
    # a teacher the server would have the node train (teacher.model) becomes the node's own file too
    trained = config_from_dict({**raw, "teacher": {"model": {"name": "smallnet3"}}})
    assert node_run_config(trained, read_node_settings(node_cfg)).teacher.checkpoint == tmp_path / "teacher"
    for missing, words in (("teacher", "lacks 'teacher': this run distils"),
                           ("generator", "lacks 'generator': this run shares a CSG generator")):
        with pytest.raises(ValueError, match=words):
            node_run_config(cfg, read_node_settings({k: v for k, v in node_cfg.items() if k != missing}))
    with pytest.raises(ValueError, match="does not exist on this node"):
        node_run_config(cfg, read_node_settings({**node_cfg, "teacher": str(tmp_path / "nope")}))
    with pytest.raises(ValueError, match="holds no partition.json"):
        node_run_config(cfg, read_node_settings({**node_cfg, "data-dir": str(tmp_path / "teacher")}))


def deploy_grid(nodes_dir: Path | None, clients: int = 3) -> LocalGrid:
    grid = LocalGrid(client_app, clients)
    if nodes_dir is not None:
        for i in range(clients):
            grid.contexts[NODE_ID_BASE + i].node_config["data-dir"] = str(node_folder(nodes_dir, i))
    return grid


def test_deployed_nodes_train_on_their_folders_exactly_as_the_simulation(tmp_path: Path, caplog) -> None:
    """Node folders from `compactfl partition` give the same final weights as the simulation of the same config;
    a node whose folder is missing replies with a one-line error that the server logs, and the round goes on."""
    sim = config_from_dict(raw_config(tmp_path / "sim"))
    write_node_partitions(sim, tmp_path / "nodes")
    run_server(deploy_grid(None), sim, sim.run_dir)
    dep = config_from_dict(raw_config(tmp_path / "dep"))
    run_server(deploy_grid(tmp_path / "nodes"), dep, dep.run_dir)
    a = safetensors.torch.load_file(str(sim.run_dir / "model.safetensors"))
    b = safetensors.torch.load_file(str(dep.run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    grid = deploy_grid(tmp_path / "nodes")
    grid.contexts[NODE_ID_BASE + 2].node_config["data-dir"] = str(tmp_path / "gone")
    lost = config_from_dict(raw_config(tmp_path / "lost", engine={"kind": "flower", "rounds": 1, "clients": 3,
                                                                   "min_train_nodes": 1}))
    with caplog.at_level(logging.WARNING, logger="compactfl.server"):
        run_server(grid, lost, lost.run_dir)
    failed = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    assert failed == [f"round 1: node {NODE_ID_BASE + 2} failed: ValueError: node config 'data-dir': "
                      f"{str(tmp_path / 'gone')!r} does not exist on this node"]
    history = json.loads((lost.run_dir / "metrics.json").read_text())["history"]
    assert history[0]["replies_failed"] == 1 and history[0]["replies_ok"] == 2
