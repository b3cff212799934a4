"""The embedded CIFAR-10 subset: real images, balanced, small, pickle-free, reproducible from shared/."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DataError, load_embedded, load_split
from pipeline.data.embedded import ASSET, _decoded
from pipeline.data.make_embedded import build


def test_asset_is_small_and_pickle_free() -> None:
    assert ASSET.stat().st_size <= 6 * 1024 * 1024
    with np.load(ASSET, allow_pickle=False) as z:
        assert set(z.files) >= {"jpeg", "offsets", "labels", "train"}
        assert bytes(z["jpeg"][:3]) == b"\xff\xd8\xff"  # stored as JPEG files, not pixels


def test_embedded_counts_balance_and_realism() -> None:
    train, test = load_embedded("train"), load_embedded("test")
    assert train.images.shape == (5000, 32, 32, 3) and test.images.shape == (1000, 32, 32, 3)
    assert np.bincount(train.labels, minlength=10).tolist() == [500] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [100] * 10
    assert train.class_names[9] == "truck" and train.num_classes == 10
    flat = train.images.reshape(len(train), -1)
    assert len(np.unique(flat, axis=0)) == len(train)  # every image differs
    mean = train.images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=0.03)  # CIFAR-10 channel means
    assert len(np.unique(train.labels[:100])) == 10  # shuffled order: a train_limit prefix is mixed
    assert load_split(DataConfig(train_limit=30), "train").labels.tolist() == train.labels[:30].tolist()
    assert _decoded.cache_info().hits >= 1  # decoded once per process


def test_embedded_missing_asset_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="embedded CIFAR-10 subset missing .*python -m pipeline.data.make_embedded"):
        load_embedded("train", tmp_path / "none.npz")
    with pytest.raises(DataError, match="split: expected 'train' or 'test'"):
        load_embedded("val")


def test_asset_regenerates_byte_identically(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "data" / "cifar10-jpeg.npz"
    out = tmp_path / "subset.npz"
    info = build(source, out)
    assert info == {"train": 5000, "test": 1000, "bytes": ASSET.stat().st_size}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(ASSET.read_bytes()).hexdigest()
    with np.load(source) as src, np.load(ASSET) as sub:  # labels and pixels are the shared copy's
        idx = sub["source_index"][[0, 4999, 5000]]
        assert np.array_equal(src["labels"][idx], sub["labels"][[0, 4999, 5000]])
        off = src["offsets"]
        pixels = np.asarray(Image.open(io.BytesIO(src["jpeg"][off[idx[0]]:off[idx[0] + 1]].tobytes())).convert("RGB"))
    np.testing.assert_array_equal(load_embedded("train").images[0], pixels)


def test_asset_found_outside_the_package(monkeypatch, tmp_path):
    """A Flower App Bundle carries no .npz: the subset is then found via the env var or the installed dist."""
    import shutil

    from pipeline.data import embedded

    copy = tmp_path / "subset.npz"
    shutil.copy(ASSET, copy)
    monkeypatch.setattr(embedded, "ASSET", tmp_path / "missing" / "cifar10_subset.npz")
    monkeypatch.setenv(embedded.ASSET_ENV, str(copy))
    assert embedded.find_asset() == copy
    monkeypatch.delenv(embedded.ASSET_ENV)
    assert embedded.find_asset() != copy  # falls through to the installed distribution (or the default path)
