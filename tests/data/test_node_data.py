"""Per-node data folders (``compactfl partition``): the same samples as the simulation's split, read safely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.config import config_from_dict
from pipeline.data import DataError, client_partition, client_train_loader, load_split, test_shard_loader
from pipeline.data.node_data import ARRAYS, MANIFEST, load_node_data, node_folder, write_node_partitions


def raw_config(tmp_path: Path, kind: str = "dirichlet") -> dict:
    return {"name": "nd", "seed": 5, "output": str(tmp_path / "runs"),
            "data": {"train_limit": 300, "test_limit": 70, "augment": True,
                     "partition": {"kind": kind, "alpha": 0.5, "min_size": 5, "classes_per_client": 4}},
            "model": {"name": "smallnet3"}, "engine": {"kind": "flower", "clients": 3},
            "train": {"batch_size": 16, "eval_batch_size": 32}}


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_written_partitions_equal_the_simulation_split(tmp_path: Path, kind: str) -> None:
    cfg = config_from_dict(raw_config(tmp_path, kind))
    write_node_partitions(cfg, tmp_path / "nodes")
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    seen = 0
    for i in range(3):
        node = load_node_data(node_folder(tmp_path / "nodes", i), i, 3)
        idx = client_partition(cfg, i, 3)
        assert np.array_equal(node.train.images, train.images[idx])
        assert np.array_equal(node.train.labels, train.labels[idx])
        assert np.array_equal(node.test.images, test.images[i::3])
        assert np.array_equal(node.test.labels, test.labels[i::3])
        seen += len(idx)
    assert seen == len(train)


def test_a_node_folder_gives_the_simulation_batches(tmp_path: Path) -> None:
    """Same samples, same order, same seeded shuffling and augmentation: identical batches."""
    cfg = config_from_dict(raw_config(tmp_path))
    write_node_partitions(cfg, tmp_path / "nodes")
    node_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": node_folder(tmp_path / "nodes", 1),
                                                                          "train_limit": 7})})
    for make in (lambda c: client_train_loader(c, 1, 3), lambda c: test_shard_loader(c, 1, 3)):
        sim, dep = make(cfg), make(node_cfg)
        for _ in range(2):  # two epochs: reshuffled and re-augmented alike
            for (xs, ys), (xd, yd) in zip(sim, dep, strict=True):
                torch.testing.assert_close(xs, xd)
                assert torch.equal(ys, yd)


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_missing_tampered_or_foreign_folders_are_refused_in_one_line(tmp_path: Path) -> None:
    cfg = config_from_dict(raw_config(tmp_path))
    write_node_partitions(cfg, tmp_path / "nodes")
    folder = node_folder(tmp_path / "nodes", 0)
    with pytest.raises(DataError) as e:
        load_node_data(tmp_path / "nodes" / "node-9", 0, 3)
    assert "does not exist" in one_line_error(e)
    with pytest.raises(DataError) as e:
        load_node_data(folder, 1, 3)
    assert "holds partition 0 of 3" in one_line_error(e)
    with pytest.raises(DataError) as e:
        load_node_data(folder, 0, 3, "cifar100")
    assert "holds cifar10 data, the run trains on cifar100" in one_line_error(e)

    data = bytearray((folder / ARRAYS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / ARRAYS).write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        load_node_data(folder, 0, 3)
    assert "sha256" in one_line_error(e)

    # a consistent manifest does not make a pickled object array loadable
    np.savez(folder / ARRAYS, train_images=np.array([object()], dtype=object), train_labels=np.zeros(1),
             test_images=np.zeros(1), test_labels=np.zeros(1))
    manifest = json.loads((folder / MANIFEST).read_text())
    from pipeline.data.node_data import _sha256

    manifest["sha256"] = _sha256(folder / ARRAYS)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        load_node_data(folder, 0, 3)
    assert "unreadable" in one_line_error(e) and "pickle" in str(e.value)

    (folder / ARRAYS).unlink()
    with pytest.raises(DataError) as e:
        load_node_data(folder, 0, 3)
    assert "missing" in one_line_error(e)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(DataError) as e:
        load_node_data(folder, 0, 3)
    assert "not valid JSON" in one_line_error(e)


def test_partition_command_writes_every_node_and_refuses_a_non_flower_config(tmp_path: Path, capsys) -> None:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path, "iid")))
    assert cli_main(["partition", str(path), "--out", str(tmp_path / "nodes"), "--set", "engine.clients=2"]) == 0
    assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == ["node-0", "node-1"]
    assert json.loads((tmp_path / "nodes" / "node-1" / MANIFEST).read_text())["num_partitions"] == 2
    capsys.readouterr()
    path.write_text(yaml.safe_dump({**raw_config(tmp_path, "iid"), "engine": {"kind": "local"}}))
    assert cli_main(["partition", str(path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compactfl: partition: engine.kind must be 'flower'") and "\n" not in err
