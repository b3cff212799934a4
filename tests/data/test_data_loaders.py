"""DataLoaders: seeded per-epoch shuffling and augmentation, samplers, workers, config-level loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline.config import RunConfig, config_from_dict
from pipeline.data import (
    CifarLoader,
    ImageDataset,
    client_partition,
    client_train_loader,
    dataset_for,
    load_split,
    make_test_loader,
    make_train_loader,
    test_loader,
    train_loader,
)
from pipeline.data.transforms import normalize, stats_for


def _id_dataset(n: int = 50) -> ImageDataset:
    """Images with random pixels; the label is the sample index, so batches reveal the order."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageDataset(images, torch.arange(n), num_classes=n)


def _epoch(loader) -> tuple[list[int], torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(ys).tolist(), torch.cat(xs)


def test_train_loader_shuffles_per_epoch_reproducibly() -> None:
    ds = _id_dataset()
    a = make_train_loader(ds, 8, seed=5, augment=True)
    assert isinstance(a, DataLoader) and a.num_workers == 0
    order0, x0 = _epoch(a)
    order1, x1 = _epoch(a)
    assert sorted(order0) == list(range(50)) == sorted(order1) and order0 != order1
    b = make_train_loader(ds, 8, seed=5, augment=True)
    b.set_epoch(1)  # a fresh loader resumed at epoch 1 replays epoch 1 exactly (order and augmentations)
    order1b, x1b = _epoch(b)
    assert order1b == order1 and torch.equal(x1b, x1)
    c = make_train_loader(ds, 8, seed=6, augment=True)
    assert _epoch(c)[0] != order0
    assert x0.dtype == torch.float32 and x0.shape == (50, 3, 32, 32)


def test_augmentation_is_a_crop_flip_of_the_normalised_image() -> None:
    ds = _id_dataset(16)
    mean, std = stats_for("cifar10")
    order, x = _epoch(make_train_loader(ds, 16, seed=0, augment=True))
    clean = normalize(ds.base_images[order], mean, std)
    assert not torch.equal(x, clean)
    plain_order, plain = _epoch(make_train_loader(ds, 16, seed=0, augment=False))
    torch.testing.assert_close(plain, normalize(ds.base_images[plain_order], mean, std))
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), mean, std).view(3)
    for i in range(16):  # the centre 24x24 of every crop (shift <= 4) comes from the image, flipped or not
        centre = x[i, :, 4:28, 4:28]
        assert not torch.isclose(centre, black.view(3, 1, 1).expand_as(centre)).all()


def test_distributed_sampler_and_indices() -> None:
    ds = _id_dataset(40)
    loaders = [make_train_loader(ds, 4, seed=r, sampler=DistributedSampler(ds, num_replicas=2, rank=r, seed=1))
               for r in range(2)]
    e0 = [_epoch(ld)[0] for ld in loaders]
    assert sorted(e0[0] + e0[1]) == list(range(40)) and not set(e0[0]) & set(e0[1])
    e1 = [_epoch(ld)[0] for ld in loaders]
    assert e1[0] != e0[0] and loaders[0].sampler.epoch == 1  # the loader advanced the sampler's epoch
    loaders[0].sampler.set_epoch(0)  # an epoch set on the sampler directly is honoured
    assert _epoch(loaders[0])[0] == e0[0]
    part = make_train_loader(ds, 4, seed=0, indices=np.array([3, 7, 11, 30]))
    assert sorted(_epoch(part)[0]) == [3, 7, 11, 30]


def test_workers_reproducible() -> None:
    ds = _id_dataset(24)
    runs = [_epoch(make_train_loader(ds, 4, seed=1, augment=True, num_workers=2)) for _ in range(2)]
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_plain_dataloader_gets_normalised_samples() -> None:
    ds = _id_dataset(20)
    ref = _epoch(make_test_loader(ds, 7))[1]
    plain = torch.cat([x for x, _ in DataLoader(Subset(ds, list(range(20))), batch_size=6)])
    torch.testing.assert_close(plain, ref)
    torch.testing.assert_close(ds[3][0], ref[3])


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return config_from_dict({"seed": 3, "data": {"train_limit": 600, "test_limit": 200,
                                                 "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 20}},
                             "train": {"batch_size": 32, "eval_batch_size": 64}})


def test_client_loaders_cover_the_training_split(cfg: RunConfig) -> None:
    sizes, seen = [], []
    for pid in range(4):
        loader = client_train_loader(cfg, pid, 4)
        assert isinstance(loader, CifarLoader) and loader.batch_size == 32
        sizes.append(len(loader.dataset))
        seen.append(set(client_partition(cfg, pid, 4).tolist()))
        x, y = next(iter(loader))
        assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
    assert sum(sizes) == 600 and min(sizes) >= 20
    assert set().union(*seen) == set(range(600)) and sum(len(s) for s in seen) == 600
    assert np.array_equal(client_partition(cfg, 2, 4), client_partition(cfg.model_copy(), 2, 4))
    with pytest.raises(ValueError, match="partition_id 4 is outside 0..3"):
        client_partition(cfg, 4, 4)


def test_config_loaders(cfg: RunConfig) -> None:
    test = test_loader(cfg)
    labels = torch.cat([y for _, y in test])
    assert len(labels) == 200 and torch.equal(labels, torch.from_numpy(load_split(cfg.data, "test").labels))
    x = torch.cat([x for x, _ in test])
    assert abs(float(x.mean())) < 0.15 and 0.85 < float(x.std()) < 1.15  # normalised real images
    assert dataset_for(cfg.data, "train") is dataset_for(cfg.data.model_copy(), "train")  # cached per process
    ranks = [train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    assert sum(len(_epoch(ld)[0]) for ld in ranks) == 600


def test_test_shards_cover_the_test_set_exactly_once_on_the_batched_path() -> None:
    from pipeline.config import config_from_dict
    from pipeline.data import test_loader, test_shard_loader
    from pipeline.data.loaders import CifarLoader

    cfg = config_from_dict({"data": {"test_limit": 50}, "train": {"eval_batch_size": 8}})
    full = torch.cat([x for x, _ in test_loader(cfg)])
    shards = [test_shard_loader(cfg, k, 3) for k in range(3)]
    assert all(isinstance(s, CifarLoader) for s in shards)
    parts = [torch.cat([x for x, _ in s]) for s in shards]
    assert sum(len(p) for p in parts) == len(full) == 50
    for k, part in enumerate(parts):
        torch.testing.assert_close(part, full[k::3])
