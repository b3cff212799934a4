"""Teacher stage: checkpoint loading (and its mismatch error), training + reuse, freezing, logit cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import models
import pipeline.teacher as teacher_mod
from pipeline.config import config_from_dict
from pipeline.distill import build_loss
from pipeline.stages import save_model
from pipeline.teacher import LogitCache, get_teacher, load_teacher_checkpoint


def saved_teacher(tmp_path: Path, name: str = "wrn-10-1", num_classes: int = 10) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(1)
    model = models.build(name, num_classes=num_classes)
    for m in model.modules():  # non-default BN statistics so a lost buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    save_model(model, models.model_spec(model), tmp_path, {})
    return model.eval(), tmp_path / "model.safetensors"


def kd_cfg(checkpoint: Path, **data) -> object:
    return config_from_dict({"model": {"name": "wrn-10-1", "kwargs": {"block": "G(4)"}},
                             "teacher": {"checkpoint": str(checkpoint), "cache_logits": data.pop("cache", False)},
                             "distill": {"kind": "kd"}, "data": data, "device": "cpu"})


def test_get_teacher_loads_checkpoint_frozen(tmp_path: Path) -> None:
    original, ckpt = saved_teacher(tmp_path)
    for path in (ckpt, tmp_path):  # the file or its run dir
        t = get_teacher(kd_cfg(path), "cpu")
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(t(x), original(x))
    assert get_teacher(config_from_dict({}), "cpu") is None


def test_checkpoint_mismatch_names_the_first_key(tmp_path: Path) -> None:
    _, ckpt = saved_teacher(tmp_path)
    meta = tmp_path / "model.json"
    doc = json.loads(meta.read_text())
    doc["spec"]["kwargs"] = {"block": "G(4)"}  # the weights are of an S network
    meta.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"first mismatched key: missing key 'group1\.0\.body\.conv1\.gconv\."):
        load_teacher_checkpoint(ckpt)
    doc["spec"]["kwargs"], doc["spec"]["name"] = {}, "wrn-10-2"  # wider: same keys, other shapes
    meta.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"key 'group1\.0\.body\.conv1\.weight' has shape \(16, 16, 3, 3\)"):
        load_teacher_checkpoint(ckpt)
    state = safetensors.torch.load_file(str(ckpt))
    del state["fc.bias"]
    doc["spec"]["kwargs"], doc["spec"]["name"] = {}, "wrn-10-1"
    meta.write_text(json.dumps(doc))
    safetensors.torch.save_file(state, str(ckpt))
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit wrn-10-1.*missing key 'fc\.bias'"):
        load_teacher_checkpoint(ckpt)


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_teacher_checkpoint(tmp_path / "nope.safetensors")
    _, ckpt = saved_teacher(tmp_path)
    with pytest.raises(ValueError, match="10-class model, the data have 100"):
        load_teacher_checkpoint(ckpt, num_classes=100)
    meta = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "spec": {**meta["spec"], "name": "wrn-11-1"}}))
    with pytest.raises(ValueError, match="model.json: cannot build its model: .*depth must be 6n\\+4"):
        load_teacher_checkpoint(ckpt)
    (tmp_path / "model.json").write_text(json.dumps(meta))
    ckpt.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_teacher_checkpoint(ckpt)
    (tmp_path / "model.json").unlink()
    with pytest.raises(ValueError, match="no model.json beside"):
        load_teacher_checkpoint(ckpt)


def test_trainable_state_checkpoint_without_batch_counters_loads(tmp_path: Path) -> None:
    original, ckpt = saved_teacher(tmp_path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in models.trainable_state(original).items()}, str(ckpt))
    loaded = load_teacher_checkpoint(ckpt).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), original(x))


def test_logit_cache_returns_teacher_logits_and_hits(tmp_path: Path) -> None:
    original, ckpt = saved_teacher(tmp_path)
    with pytest.raises(ValueError, match="cache_logits needs data.augment: false"):
        get_teacher(kd_cfg(ckpt, cache=True), "cpu")
    t = get_teacher(kd_cfg(ckpt, cache=True, augment=False), "cpu")
    assert isinstance(t, LogitCache)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        first = t(x[:4])
        second = t(x[2:])  # two seen, two new
        expected = original(x)
    torch.testing.assert_close(first, expected[:4])
    torch.testing.assert_close(second, expected[2:])
    assert (t.hits, t.misses, len(t)) == (2, 6, 6)
    t.train()
    assert not t.training and not t.teacher.training
    _, feats = t(x, return_features=True)  # AT bypasses the cache
    assert len(feats) == 3
    student = models.build("wrn-10-1", block="G(4)")
    loss, _ = build_loss(kd_cfg(ckpt, augment=False).distill, t)(student, x, torch.zeros(6, dtype=torch.long))
    loss.backward()
    assert t.hits == 8


def test_train_teacher_then_reuse(tmp_path: Path, cifar10_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict({
        "name": "distill", "output": str(tmp_path), "device": "cpu", "seed": 3,
        "data": {"root": str(cifar10_root), "test_limit": 20},
        "model": {"name": "wrn-10-1", "kwargs": {"block": "G(4)"}},
        "teacher": {"model": {"name": "wrn-10-1"}, "train": {"epochs": 1, "max_batches": 2, "batch_size": 16}},
        "distill": {"kind": "at"},
    })
    t = get_teacher(cfg, "cpu")
    saved = tmp_path / "distill" / "teacher"
    assert (saved / "model.safetensors").is_file()
    assert json.loads((saved / "model.json").read_text())["spec"]["name"] == "wrn-10-1"
    assert not t.training and not any(p.requires_grad for p in t.parameters())

    def no_training(*_a, **_k):
        raise AssertionError("the saved teacher should have been reused")

    monkeypatch.setattr(teacher_mod, "train_teacher", no_training)
    again = get_teacher(cfg, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), again.state_dict().values(), strict=True))
    changed = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"train": None})})
    with pytest.raises(AssertionError, match="reused"):  # other teacher settings: retrain, not reuse
        get_teacher(changed, "cpu")


def test_no_teacher_is_built_when_the_run_does_not_distil(tmp_path: Path) -> None:
    """A teacher section with ``distill: none`` is inert: nothing is trained or saved."""
    cfg = config_from_dict({"name": "plain", "output": str(tmp_path), "device": "cpu",
                            "teacher": {"model": {"name": "smallnet3"}, "train": {"epochs": 1}}})
    assert get_teacher(cfg, "cpu") is None
    assert not (tmp_path / "plain" / "teacher").exists()
