"""Bit packing and index-set coding (``pipeline.transport.packing``): exact sizes, round trips, refusals."""

from __future__ import annotations

import pytest
import torch

from pipeline.transport.packing import (
    TAG_BITMAP,
    TAG_FIXED,
    TAG_VARINT,
    decode_indices,
    encode_indices,
    pack_bits,
    packed_len,
    unpack_bits,
    varint_decode,
    varint_encode,
)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8, 13, 40])
def test_pack_bits_round_trips_with_exact_length(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    for count in (0, 1, 7, 8, 9, 1001):
        codes = torch.randint(0, 2**width, (count,), generator=gen, dtype=torch.int64)
        packed = pack_bits(codes, width)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_len(count, width) == -(-count * width // 8)
        assert torch.equal(unpack_bits(packed, width, count), codes)


def test_pack_bits_layout_is_lsb_first() -> None:
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b00001101, 1]
    assert pack_bits(torch.tensor([3, 1]), 2).tolist() == [0b0111]
    assert pack_bits(torch.tensor([5, 2, 7]), 3).tolist() == [0b11010101, 0b1]


def test_unpack_refuses_wrong_lengths_and_widths() -> None:
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="bit width"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 0, 1)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(1, dtype=torch.int32), 8, 1)


def test_varints_round_trip_and_use_seven_bits_per_byte() -> None:
    values = torch.tensor([0, 1, 127, 128, 16383, 16384, 2**35 + 3])
    data = varint_encode(values)
    assert data.numel() == 1 + 1 + 1 + 2 + 2 + 3 + 6
    assert torch.equal(varint_decode(data, values.numel(), max_bytes=6), values)
    with pytest.raises(ValueError, match="ends inside"):
        varint_decode(data[:-1], values.numel(), max_bytes=6)
    with pytest.raises(ValueError, match="expected 6 varints, found 7"):
        varint_decode(data, 6, max_bytes=6)
    with pytest.raises(ValueError, match="longer than 5"):
        varint_decode(data, values.numel(), max_bytes=5)


def _indices(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


CLUSTERED = torch.cat([torch.arange(0, 200, 2), torch.tensor([90_000, 99_999])])  # small gaps, two far jumps


@pytest.mark.parametrize(("n", "idx", "tag"), [
    (10_000, _indices(10_000, 5000, seed=0), TAG_BITMAP),   # dense support: one bit per element wins
    (100_000, CLUSTERED, TAG_VARINT),                       # small gaps + rare large ones: varints win
    (4096, _indices(4096, 16, seed=2), TAG_FIXED),          # similar gaps: one fixed width wins
    (64, torch.arange(64), TAG_BITMAP),
])
def test_index_sets_take_the_smallest_format_and_count_bytes_exactly(n: int, idx: torch.Tensor, tag: int) -> None:
    k = idx.numel()
    data = encode_indices(idx, n)
    gaps = torch.cat([idx[:1], idx[1:] - idx[:-1] - 1])
    width = max(1, int(gaps.max()).bit_length())
    sizes = {TAG_BITMAP: 1 + -(-n // 8), TAG_FIXED: 2 + -(-k * width // 8),
             TAG_VARINT: 1 + sum(max(1, -(-int(g).bit_length() // 7)) for g in gaps)}
    assert int(data[0]) == tag
    assert data.numel() == sizes[tag] == min(sizes.values())
    assert torch.equal(decode_indices(data, n, k), idx)


def test_index_decoding_refuses_malformed_streams() -> None:
    n, k = 1000, 10
    idx = _indices(n, k, seed=1)
    varint = encode_indices(idx, n)
    assert int(varint[0]) in (TAG_VARINT, TAG_FIXED)
    cases = {
        "unknown index format": torch.tensor([9, 1, 2], dtype=torch.uint8),
        "bitmap marks 0": torch.cat([torch.tensor([TAG_BITMAP], dtype=torch.uint8),
                                     torch.zeros(125, dtype=torch.uint8)]),
        "bitmap of 1000": torch.tensor([TAG_BITMAP, 1], dtype=torch.uint8),
        "width 12 bits": torch.tensor([TAG_FIXED, 12, 0, 0], dtype=torch.uint8),
        # nine gaps of 1 (indices 1, 3, ..., 17), then a gap of 990: index 1008 >= 1000
        "out of range": torch.tensor([TAG_VARINT] + [1] * 9 + [0xDE, 0x07], dtype=torch.uint8),
        "does not fit": torch.tensor([TAG_VARINT] + [1] * 9 + [0xFF, 0x07], dtype=torch.uint8),  # gap 1023
        "non-empty": torch.zeros(0, dtype=torch.uint8),
    }
    for needle, data in cases.items():
        with pytest.raises(ValueError, match=needle):
            decode_indices(data, n, k)
