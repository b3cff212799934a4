"""Batch transforms: normalisation, padded crop and flip on hand-made tensors, determinism under a seed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.transforms import (
    crop_flip,
    epoch_generator,
    hash_seed,
    normalize,
    normalized_black,
    random_crop,
    random_crop_flip,
    random_hflip,
    sample_crop_flip,
    single_threaded,
    stats_for,
)


def _images(b: int = 6, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.randint(1, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_normalize_per_channel() -> None:
    mean, std = stats_for("cifar10")
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 255, 0, 128
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[0, 0], torch.full((4, 4), (1 - mean[0]) / std[0]))
    torch.testing.assert_close(y[1, 1], torch.full((4, 4), -mean[1] / std[1]))
    torch.testing.assert_close(y[0, 2], torch.full((4, 4), (128 / 255 - mean[2]) / std[2]))


def test_crop_flip_on_hand_made_tensor() -> None:
    x = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    x = x.expand(3, 1, 3, 3).contiguous()
    out = crop_flip(x, torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1]), torch.tensor([False, False, True]), pad=1)
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]  # top-left of the padded image
    assert out[1, 0].tolist() == [[4, 5, 6], [7, 8, 9], [0, 0, 0]]  # bottom, centred horizontally
    assert out[2, 0].tolist() == [[3, 2, 1], [6, 5, 4], [9, 8, 7]]  # centred, mirrored


def test_crop_flip_matches_per_image_reference() -> None:
    x = _images(16, 32, 32)
    oy, ox, flip = sample_crop_flip(16, 4, torch.Generator().manual_seed(3))
    out = crop_flip(x, oy, ox, flip, pad=4)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(16):
        ref = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        torch.testing.assert_close(out[i], ref.flip(-1) if flip[i] else ref, rtol=0, atol=0)
    assert 0 < int(flip.sum()) < 16 and len(set(oy.tolist())) > 1


def test_fill_pads_normalised_images_with_normalised_black() -> None:
    mean, std = stats_for("cifar100")
    x = _images()
    oy, ox, flip = sample_crop_flip(len(x), 4, torch.Generator().manual_seed(0))
    a = normalize(crop_flip(x, oy, ox, flip, 4), mean, std)
    b = crop_flip(normalize(x, mean, std), oy, ox, flip, 4, fill=normalized_black(mean, std))
    torch.testing.assert_close(a, b)


def test_random_transforms_deterministic_under_seed() -> None:
    x = _images(32, 32, 32)
    a = random_crop_flip(x, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, torch.Generator().manual_seed(7))
    c = random_crop_flip(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(random_hflip(x, epoch_generator(0, 1)), random_hflip(x, epoch_generator(0, 1)))
    assert not torch.equal(random_crop(x, epoch_generator(0, 1)), random_crop(x, epoch_generator(0, 2)))


def test_random_crop_and_flip_only_move_pixels() -> None:
    x = _images(8)
    flipped = random_hflip(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(flipped, x.flip(-1))
    assert torch.equal(random_hflip(x, None, p=0.0), x)
    cropped = random_crop(x, torch.Generator().manual_seed(0), pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every output is one of the 25 shifted windows, never a mirror
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(cropped[i], w) for w in windows)


def test_hash_seed_separates_nearby_inputs() -> None:
    seeds = {hash_seed(s, e, k) for s in range(4) for e in range(4) for k in range(4)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert hash_seed(1, 2) == hash_seed(1, 2) != hash_seed(2, 1)


def test_single_threaded_restores_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
