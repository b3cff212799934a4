"""Bit-level packing of what codecs send: k-bit codes into bytes, and sorted index sets in the fewest bytes.

Everything is vectorised torch on the tensor's own device (CPU or CUDA). Decoders receive untrusted bytes:
every malformed input (wrong length, bad width, out-of-range or unsorted indices) raises ``ValueError``.

Index sets (the support of a top-k update) travel in the smallest of three formats, chosen per tensor and
announced by a leading tag byte:

- ``bitmap``: one bit per element of the tensor (``1 + ceil(n / 8)`` bytes);
- ``varint``: the gaps between consecutive sorted indices as LEB128 varints (7 bits per byte);
- ``fixed``: the gaps at one fixed bit width ``w`` (a second header byte), packed ``w`` bits each.

Gaps are ``g_0 = i_0`` and ``g_j = i_j - i_{j-1} - 1`` (so they are >= 0 and indices strictly increase).
"""

from __future__ import annotations

import torch

TAG_BITMAP, TAG_VARINT, TAG_FIXED = 0, 1, 2
_U8 = torch.uint8


def packed_len(count: int, width: int) -> int:
    """Bytes holding ``count`` codes of ``width`` bits each."""
    return (count * width + 7) // 8


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**width) into bytes, ``width`` bits each, LSB first."""
    if not 1 <= width <= 62:
        raise ValueError(f"bit width must be in 1..62, got {width}")
    codes = codes.reshape(-1)
    n = codes.numel()
    if width == 8:
        return codes.to(_U8)
    if width in (1, 2, 4):
        per = 8 // width
        c = codes.to(_U8)
        pad = (-n) % per
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        shifts = torch.arange(0, 8, width, dtype=_U8, device=c.device)
        return (c.view(-1, per) << shifts).sum(1, dtype=torch.int32).to(_U8)
    small = width < 8
    c = codes.to(_U8 if small else torch.int64)
    shifts = torch.arange(width, device=c.device, dtype=c.dtype)
    bits = ((c.unsqueeze(1) >> shifts) & 1).to(_U8).reshape(-1)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) << torch.arange(8, dtype=_U8, device=c.device)).sum(1, dtype=torch.int32).to(_U8)


def unpack_bits(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` int64 codes of ``width`` bits from exactly the packed bytes."""
    if not 1 <= width <= 62:
        raise ValueError(f"bit width must be in 1..62, got {width}")
    if data.dtype != _U8 or data.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 buffer, got {data.dtype} {tuple(data.shape)}")
    if data.numel() != packed_len(count, width):
        raise ValueError(f"{count} codes of {width} bits need {packed_len(count, width)} bytes, "
                         f"got {data.numel()}")
    if width == 8:
        return data.to(torch.int64)
    if width in (1, 2, 4):
        shifts = torch.arange(0, 8, width, dtype=_U8, device=data.device)
        codes = (data.unsqueeze(1) >> shifts) & ((1 << width) - 1)
        return codes.reshape(-1)[:count].to(torch.int64)
    bits = ((data.unsqueeze(1) >> torch.arange(8, dtype=_U8, device=data.device)) & 1).reshape(-1)
    bits = bits[: count * width].view(count, width).to(torch.int64)
    return (bits << torch.arange(width, device=data.device)).sum(1)


# --------------------------------------------------------------------------------------------- varints
def _varint_lengths(values: torch.Tensor) -> torch.Tensor:
    lengths = torch.ones_like(values)
    for j in range(1, 9):
        lengths += (values >= (1 << (7 * j))).to(values.dtype)
    return lengths


def varint_encode(values: torch.Tensor) -> torch.Tensor:
    """Non-negative int64 ``values`` as LEB128 varints (7 payload bits per byte, high bit = more follows)."""
    values = values.reshape(-1).to(torch.int64)
    lengths = _varint_lengths(values)
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    total = int(ends[-1]) if values.numel() else 0
    out = torch.zeros(total, dtype=torch.int64, device=values.device)
    for j in range(int(lengths.max()) if values.numel() else 0):
        mask = lengths > j
        byte = (values[mask] >> (7 * j)) & 0x7F
        more = (lengths[mask] - 1 > j).to(torch.int64) << 7
        out[starts[mask] + j] = byte | more
    return out.to(_U8)


def varint_decode(data: torch.Tensor, count: int, max_bytes: int) -> torch.Tensor:
    """Exactly ``count`` varints from ``data`` (each at most ``max_bytes`` long), as int64."""
    if data.numel() == 0:
        if count:
            raise ValueError(f"expected {count} varints, got an empty buffer")
        return torch.zeros(0, dtype=torch.int64, device=data.device)
    d = data.to(torch.int64)
    last = d < 0x80
    if not bool(last[-1]):
        raise ValueError("varint stream ends inside a number")
    found = int(last.sum())
    if found != count:
        raise ValueError(f"expected {count} varints, found {found}")
    group = torch.cumsum(last.to(torch.int64), 0) - last.to(torch.int64)
    pos = torch.arange(d.numel(), device=d.device)
    first = torch.zeros(count, dtype=torch.int64, device=d.device)
    first.scatter_reduce_(0, group, pos, reduce="amin", include_self=False)
    offset = pos - first[group]
    if int(offset.max()) >= max_bytes:
        raise ValueError(f"a varint is longer than {max_bytes} bytes")
    out = torch.zeros(count, dtype=torch.int64, device=d.device)
    out.scatter_add_(0, group, (d & 0x7F) << (7 * offset))
    return out


# ---------------------------------------------------------------------------------------- index sets
def _bit_length(x: int) -> int:
    return max(1, int(x).bit_length())


def encode_indices(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Strictly increasing ``indices`` into ``range(n)`` in the smallest of bitmap / varint / fixed gaps."""
    idx = indices.reshape(-1).to(torch.int64)
    k = idx.numel()
    dev = idx.device
    gaps = idx.clone()
    if k > 1:
        gaps[1:] = idx[1:] - idx[:-1] - 1
    width = _bit_length(int(gaps.max())) if k else 1
    sizes = {TAG_BITMAP: 1 + packed_len(n, 1), TAG_FIXED: 2 + packed_len(k, width),
             TAG_VARINT: 1 + (int(_varint_lengths(gaps).sum()) if k else 0)}
    tag = min(sizes, key=lambda t: (sizes[t], t))
    head = torch.tensor([tag], dtype=_U8, device=dev)
    if tag == TAG_BITMAP:
        mask = torch.zeros(n, dtype=_U8, device=dev)
        mask[idx] = 1
        body = pack_bits(mask, 1)
    elif tag == TAG_FIXED:
        head = torch.tensor([tag, width], dtype=_U8, device=dev)
        body = pack_bits(gaps, width)
    else:
        body = varint_encode(gaps)
    return torch.cat([head, body])


def decode_indices(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`encode_indices`: exactly ``k`` strictly increasing int64 indices below ``n``."""
    if data.dtype != _U8 or data.dim() != 1 or data.numel() < 1:
        raise ValueError("index stream must be a non-empty 1-D uint8 buffer")
    tag, body = int(data[0]), data[1:]
    max_width = _bit_length(max(n - 1, 0))
    if tag == TAG_BITMAP:
        if body.numel() != packed_len(n, 1):
            raise ValueError(f"bitmap of {n} elements needs {packed_len(n, 1)} bytes, got {body.numel()}")
        bits = unpack_bits(body, 1, n)
        idx = torch.nonzero(bits, as_tuple=False).reshape(-1)
        if idx.numel() != k:
            raise ValueError(f"bitmap marks {idx.numel()} elements, expected {k}")
        return idx
    if tag == TAG_FIXED:
        if body.numel() < 1:
            raise ValueError("fixed-width index stream lacks its width byte")
        width = int(body[0])
        if not 1 <= width <= max_width:
            raise ValueError(f"index gap width {width} bits is outside 1..{max_width}")
        gaps = unpack_bits(body[1:], width, k)
    elif tag == TAG_VARINT:
        gaps = varint_decode(body, k, max_bytes=(max_width + 6) // 7)
    else:
        raise ValueError(f"unknown index format tag {tag}")
    if k and int(gaps.max()) >= n:
        raise ValueError(f"index gap {int(gaps.max())} does not fit {n} elements")
    idx = torch.cumsum(gaps + 1, 0) - 1
    if k and int(idx[-1]) >= n:
        raise ValueError(f"index {int(idx[-1])} is out of range for {n} elements")
    return idx
