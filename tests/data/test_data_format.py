"""Official CIFAR python-format reading: round trips, the restricted unpickler, corrupt files, download."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data import DataError, download, load_cifar, load_split
from pipeline.data.formats import read_split


def _raw(path: Path) -> dict:
    with path.open("rb") as f:  # test-side reference reader for files this test trusts
        return pickle.load(f, encoding="bytes")


def _copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "cifar-10-batches-py", dst / "cifar-10-batches-py")
    return dst


def _write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


# ------------------------------------------------------------------------------------------- round trip
def test_cifar10_round_trip(cifar10_root: Path) -> None:
    train = load_cifar("cifar10", cifar10_root, "train")
    test = load_cifar("cifar10", cifar10_root, "test")
    assert train.images.shape == (200, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (100, 32, 32, 3) and train.labels.dtype == np.int64
    assert np.bincount(train.labels, minlength=10).tolist() == [20] * 10
    assert train.class_names[0] == "airplane" and len(train.class_names) == 10
    raw = _raw(cifar10_root / "cifar-10-batches-py" / "data_batch_1")
    n = len(raw[b"labels"])
    expect = raw[b"data"].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(train.images[:n], expect)
    np.testing.assert_array_equal(train.labels[:n], raw[b"labels"])


def test_load_split_applies_limits(cifar10_root: Path) -> None:
    cfg = DataConfig(root=cifar10_root, train_limit=50, test_limit=7)
    tr, te = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(tr) == 50 and len(te) == 7
    full = load_cifar("cifar10", cifar10_root, "train")
    np.testing.assert_array_equal(tr.images, full.images[:50])


def _write_cifar100(root: Path, n_train: int = 30, n_test: int = 12) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        d = {b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
             b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
             b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        _write_pickle(folder / split, d)
        out[split] = d
    _write_pickle(folder / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                                    b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    return out


def test_cifar100_round_trip(tmp_path: Path) -> None:
    written = _write_cifar100(tmp_path)
    for split in ("train", "test"):
        arr = load_cifar("cifar100", tmp_path, split)
        d = written[split]
        n = len(d[b"fine_labels"])
        assert arr.num_classes == 100 and len(arr.class_names) == 100 and arr.class_names[5] == "class5"
        np.testing.assert_array_equal(arr.labels, d[b"fine_labels"])
        np.testing.assert_array_equal(arr.images, d[b"data"].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    assert load_split(DataConfig(name="cifar100", root=tmp_path, train_limit=10), "train").labels.shape == (10,)


# --------------------------------------------------------------------------------------- unsafe pickles
class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvilExec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.mark.parametrize("payload,refused", [("system", "system"), ("exec", "builtins.exec")])
def test_malicious_pickle_is_refused_and_runs_nothing(cifar10_root: Path, tmp_path: Path, payload: str,
                                                      refused: str) -> None:
    root = _copy_root(cifar10_root, tmp_path / "root")
    marker = tmp_path / "MARKER"
    evil = _Evil(f"touch {marker}") if payload == "system" else _EvilExec(f"open({str(marker)!r}, 'w').close()")
    batch = _raw(root / "cifar-10-batches-py" / "data_batch_2")
    batch[b"labels"] = evil  # hidden inside an otherwise valid batch
    _write_pickle(root / "cifar-10-batches-py" / "data_batch_2", batch)
    with pytest.raises(DataError, match=rf"data_batch_2: refused to unpickle global .*{refused}") as err:
        read_split("cifar10", root, "train")
    assert "\n" not in str(err.value)
    assert not marker.exists()


class _Rot13:
    def __reduce__(self):
        return (codecs.encode, ("hi", "rot13"))


def test_bytes_codec_is_latin1_only(tmp_path: Path) -> None:
    # _codecs.encode is admitted only as pickle's bytes reconstruction (latin-1); other codecs are refused.
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _Rot13()})
    with pytest.raises(DataError, match="test_batch: corrupt or truncated .*only allowed as .*latin1"):
        read_split("cifar10", tmp_path, "test")


# ----------------------------------------------------------------------------------- corrupt / invalid
def test_truncated_batch_gives_clear_error(cifar10_root: Path, tmp_path: Path) -> None:
    root = _copy_root(cifar10_root, tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"data_batch_3: corrupt or truncated .*download\('cifar10'") as err:
        read_split("cifar10", root, "train")
    assert "cifar10.py" in str(err.value) and "\n" not in str(err.value)


def test_missing_folder_and_file(cifar10_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-10-batches-py: missing cifar10 folder; .*shared/data/cifar10.py"):
        read_split("cifar10", tmp_path / "nothing", "train")
    root = _copy_root(cifar10_root, tmp_path / "r")
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch: missing; get it with"):
        read_split("cifar10", root, "test")


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update({b"data": d[b"data"][:, :3000]}), "'data' must be uint8 N x 3072"),
    (lambda d: d.update({b"data": d[b"data"].astype(np.float32)}), "'data' must be uint8 N x 3072"),
    (lambda d: d.update({b"labels": [10] * len(d[b"labels"])}), r"labels must lie in \[0, 10\)"),
    (lambda d: d.update({b"labels": d[b"labels"][:-1]}), r"\d+ images but \d+ labels"),
    (lambda d: d.update({b"labels": ["cat"] * len(d[b"labels"])}), "'labels' must be a list of integers"),
    (lambda d: d.pop(b"data"), "missing key 'data'"),
])
def test_wrong_shapes_and_labels(cifar10_root: Path, tmp_path: Path, mutate, message: str) -> None:
    root = _copy_root(cifar10_root, tmp_path)
    path = root / "cifar-10-batches-py" / "test_batch"
    batch = _raw(path)
    mutate(batch)
    _write_pickle(path, batch)
    with pytest.raises(DataError, match=f"test_batch: {message}"):
        read_split("cifar10", root, "test")


def test_meta_must_name_every_class(tmp_path: Path) -> None:
    _write_cifar100(tmp_path)
    _write_pickle(tmp_path / "cifar-100-python" / "meta", {b"fine_label_names": [b"a", b"b"]})
    with pytest.raises(DataError, match="meta: 'fine_label_names' must list 100 class names"):
        read_split("cifar100", tmp_path, "test")


# -------------------------------------------------------------------------------------------- download
def _tarball(cifar10_root: Path, dest: Path) -> tuple[Path, str]:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(cifar10_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return dest, hashlib.md5(dest.read_bytes()).hexdigest()


def test_download_from_file_url(cifar10_root: Path, tmp_path: Path) -> None:
    archive, md5 = _tarball(cifar10_root, tmp_path / "cifar-10-python.tar.gz")
    root = tmp_path / "dl"
    folder = download("cifar10", root, url=archive.as_uri(), md5=md5)
    assert folder == root / "cifar-10-batches-py"
    assert len(read_split("cifar10", root, "train")) == 200
    # already complete: no fetch happens (this URL does not exist)
    assert download("cifar10", root, url=(tmp_path / "gone.tar.gz").as_uri(), md5=md5) == folder


def test_download_bad_md5_deletes_partial_file(cifar10_root: Path, tmp_path: Path) -> None:
    archive, _ = _tarball(cifar10_root, tmp_path / "cifar-10-python.tar.gz")
    root = tmp_path / "dl"
    with pytest.raises(DataError, match=r"md5 .* != expected c58f30108f718f92721af3b95e74349a .*deleted the partial"):
        download("cifar10", root, url=archive.as_uri())  # official md5 cannot match the test tarball
    assert list(root.iterdir()) == []


def test_download_refuses_escaping_tar_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "a" / "root"
    with pytest.raises(DataError, match=r"refused member '../escaped.txt' \(path escapes"):
        download("cifar10", root, url=archive.as_uri(), md5=md5)
    assert not (tmp_path / "a" / "escaped.txt").exists()
