"""Codec contracts (``pipeline.transport.codecs``): what ``decode(encode(x))`` is, exact bytes, seeding, parsing."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from pipeline.transport.codecs import QSGD, Cast, Chain, CodecContext, LowRank, Sign, TopK, parse_chain, parse_codec

CTX = CodecContext(seed=7, round=3, partition=1, name="conv.weight")
CODEC_OTHER_CTX = CodecContext(seed=8, round=4, partition=2, name="fc.weight")


def _x(n: int = 4000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.01, 2.0, n)


# ------------------------------------------------------------------------------------------------- cast
@pytest.mark.parametrize(("dtype", "rel"), [("bf16", 2**-8), ("fp16", 2**-11)])
def test_cast_is_round_to_nearest_in_half_precision(dtype: str, rel: float) -> None:
    x = _x().view(40, 100)
    enc = Cast(dtype).encode(x)
    out = Cast(dtype).decode(enc)
    torch.testing.assert_close(out, x.to(enc.parts["values"].dtype).float(), rtol=0, atol=0)
    assert out.shape == x.shape and enc.nbytes == 2 * x.numel()
    assert bool(((out - x).abs() <= rel * x.abs() + 1e-7).all())


def test_fp16_saturates_instead_of_overflowing() -> None:
    out = parse_codec("fp16").decode(parse_codec("fp16").encode(torch.tensor([1e6, -1e6, 3.0])))
    assert out.tolist() == [65504.0, -65504.0, 3.0]


# ------------------------------------------------------------------------------------------------- qsgd
@pytest.mark.parametrize(("bits", "block"), [(2, None), (4, 200), (8, 100)])
def test_qsgd_is_unbiased_within_its_variance(bits: int, block: int | None) -> None:
    """Mean over M seeded encodings converges to x: a z-score from the exact per-element variance."""
    x = _x(600, seed=bits)
    codec = QSGD(bits=bits, block=block)
    trials = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    for t in range(trials):
        acc += codec.decode(codec.encode(x, CodecContext(seed=1, round=t))).double()
    mean = acc / trials
    levels = 2 ** (bits - 1) - 1
    blocks = x.view(-1, block) if block else x.view(1, -1)
    step = (blocks.abs().amax(1, keepdim=True) / levels).expand_as(blocks).reshape(-1).double()
    frac = (x.double() / step) - torch.floor(x.double() / step)
    var = step**2 * frac * (1 - frac) / trials  # variance of the mean of each element
    z_total = float((mean - x.double()).sum() / var.sum().sqrt())
    assert abs(z_total) < 4.5
    assert float(((mean - x.double()).abs() / (var.sqrt() + 1e-6 * step)).max()) < 6.0
    # the test would catch a biased rounding: floor() is off by about step * frac per element
    floor_bias = float((step * frac).sum() / var.sum().sqrt())
    assert floor_bias > 50


def test_qsgd_error_is_below_one_step_and_bytes_are_exact() -> None:
    x = _x(1000)
    codec = parse_codec("qsgd(bits=3, block=256)")
    enc = codec.encode(x, CTX)
    out = codec.decode(enc)
    scales = x.view(-1)[: 768].view(3, 256).abs().amax(1).tolist() + [x[768:].abs().max().item()]
    step = torch.tensor(scales).repeat_interleave(torch.tensor([256, 256, 256, 232])) / 3
    assert bool(((out - x).abs() <= step * (1 + 1e-5)).all())
    assert enc.parts["levels"].numel() == math.ceil(1000 * 3 / 8) and enc.parts["scales"].numel() == 4
    assert enc.nbytes == 375 + 4 * 4
    zero = codec.decode(codec.encode(torch.zeros(10), CTX))
    assert torch.equal(zero, torch.zeros(10))


def test_nearest_rounding_is_deterministic_within_half_a_step_and_beats_stochastic_in_mse() -> None:
    x = _x(1000)
    near, stoch = parse_codec("qsgd(bits=3, block=256, rounding=nearest)"), parse_codec("qsgd(bits=3, block=256)")
    assert near.descriptor() == "qsgd(bits=3,block=256,rounding=nearest)" and not near.needs_generator()
    enc = near.encode(x, CTX)
    assert all(torch.equal(enc.parts[k], near.encode(x, CODEC_OTHER_CTX).parts[k]) for k in enc.parts)
    out = near.decode(enc)
    scales = x.view(-1)[: 768].view(3, 256).abs().amax(1).tolist() + [x[768:].abs().max().item()]
    step = torch.tensor(scales).repeat_interleave(torch.tensor([256, 256, 256, 232])) / 3
    assert bool(((out - x).abs() <= step / 2 * (1 + 1e-5)).all())
    assert float(((out - x).abs() - step / 2).max()) > -0.1 * float(step.min())  # the bound is nearly reached
    assert enc.nbytes == stoch.encode(x, CTX).nbytes == 375 + 4 * 4
    mse_near = float(((out - x) ** 2).mean())
    mse_stoch = float(((stoch.decode(stoch.encode(x, CTX)) - x) ** 2).mean())
    assert mse_near < 0.7 * mse_stoch  # about half in expectation
    on_grid = out.clone()
    assert torch.equal(near.decode(near.encode(on_grid, CTX)), on_grid)  # values on the grid stay put


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_entropy_coded_levels_decode_to_the_same_values_in_fewer_bytes(rounding: str) -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(7))
    plain, coded = QSGD(3, 256, rounding), QSGD(3, 256, rounding, entropy="deflate")
    a, b = plain.encode(x, CTX), coded.encode(x, CTX)
    assert torch.equal(plain.decode(a), coded.decode(b))  # lossless: not one decoded value changes
    assert b.parts["levels"][0] == QSGD._DEFLATED
    # max-scaled 3-bit codes of Gaussian values carry about 2.1 bits: 30% under the packed 3 bits
    assert b.parts["levels"].numel() < 0.8 * a.parts["levels"].numel()
    assert torch.equal(b.parts["scales"], a.parts["scales"])


def test_entropy_coding_falls_back_to_packed_codes_when_deflate_does_not_shrink_them() -> None:
    x = torch.rand(3000, generator=torch.Generator().manual_seed(8)) * 2 - 1  # uniform: 8-bit codes are random
    coded = QSGD(8, entropy="deflate")
    enc = coded.encode(x, CTX)
    assert enc.parts["levels"][0] == QSGD._PACKED and enc.parts["levels"].numel() == 3000 + 1
    assert torch.equal(coded.decode(enc), QSGD(8).decode(QSGD(8).encode(x, CTX)))
    empty = coded.encode(torch.zeros(0), CTX)
    assert coded.decode(empty).numel() == 0


def test_entropy_coded_levels_refuse_hostile_streams_with_value_errors() -> None:
    coded = QSGD(3, 256, "nearest", entropy="deflate")
    enc = coded.encode(torch.randn(1000, generator=torch.Generator().manual_seed(9)), CTX)
    levels = enc.parts["levels"]
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb_stream = bomb.compress(bytes(10_000_000)) + bomb.flush()  # ~10 KB that inflate to 10 MB
    cases = {
        "mode byte": torch.zeros(0, dtype=torch.uint8),
        "unknown levels mode 7": torch.cat([torch.tensor([7], dtype=torch.uint8), levels[1:]]),
        "does not inflate": torch.cat([levels[:1], torch.full((50,), 255, dtype=torch.uint8)]),
        "exactly 1000 codes": torch.cat([levels, torch.tensor([1, 2, 3], dtype=torch.uint8)]),
        "exactly 1000": torch.cat([levels[:1], torch.frombuffer(bytearray(bomb_stream), dtype=torch.uint8)]),
        "holds": torch.cat([torch.tensor([QSGD._PACKED], dtype=torch.uint8), levels[1:]]),
    }
    for needle, bad in cases.items():
        with pytest.raises(ValueError, match=needle):
            coded.decode(type(enc)(enc.codec, enc.shape, dict(enc.parts, levels=bad)))
    truncated = torch.cat([levels[:1], levels[1:-5]])
    with pytest.raises(ValueError, match="inflate"):
        coded.decode(type(enc)(enc.codec, enc.shape, dict(enc.parts, levels=truncated)))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bf16_scales_halve_the_scale_bytes_and_keep_the_contract_for_the_scale_that_travels(rounding: str) -> None:
    x = torch.randn(2048, generator=torch.Generator().manual_seed(10)) * 3.14159
    x[5] = 1.0001  # a block whose max rounds DOWN in bf16: it must still be representable
    x[256:512] = 1.0001 * torch.sign(x[256:512])
    wide, half = QSGD(4, 256, rounding), QSGD(4, 256, rounding, scales="bf16")
    a, b = wide.encode(x, CTX), half.encode(x, CTX)
    assert b.parts["scales"].dtype == torch.bfloat16 and b.nbytes == a.nbytes - 2 * 8
    sent = b.parts["scales"].float()
    assert bool((sent >= x.view(8, 256).abs().amax(1)).all())  # rounded up: every |x| within its scale
    assert bool((sent <= a.parts["scales"] * (1 + 2**-7)).all())
    out = half.decode(b)
    step = (sent / 7).repeat_interleave(256)
    bound = step / 2 if rounding == "nearest" else step
    assert bool(((out - x).abs() <= bound * (1 + 1e-5)).all())  # the error bound holds on the sent grid
    assert bool((out.abs().view(8, 256).amax(1) <= sent * (1 + 1e-6)).all())


def test_stochastic_rounding_is_seeded_by_the_context() -> None:
    x = _x(500)
    codec = parse_chain("topk(frac=0.5)+qsgd(bits=2)")
    a, b = codec.encode(x, CTX), codec.encode(x, CTX)
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)
    for other in (CodecContext(8, 3, 1, "conv.weight"), CodecContext(7, 4, 1, "conv.weight"),
                  CodecContext(7, 3, 2, "conv.weight"), CodecContext(7, 3, 1, "fc.weight")):
        assert not torch.equal(codec.encode(x, other).parts["levels"], a.parts["levels"])


# ------------------------------------------------------------------------------------------------- topk
def test_topk_keeps_exactly_the_largest_magnitudes() -> None:
    x = _x(5000).view(50, 100)
    for codec, k in ((TopK(frac=0.01), 50), (TopK(k=7), 7), (TopK(frac=1e-9), 1), (TopK(k=10**6), 5000)):
        enc = codec.encode(x)
        out = codec.decode(enc)
        kept = out != 0
        assert int(kept.sum()) == k
        assert torch.equal(out[kept], x[kept])
        assert float(torch.cat([x[~kept].abs(), torch.zeros(1)]).max()) <= float(x[kept].abs().min())
        assert enc.nbytes == 4 * k + enc.parts["indices"].numel()


def test_topk_of_one_percent_sends_about_five_bytes_per_kept_value() -> None:
    x = _x(100_000)
    enc = TopK(frac=0.01).encode(x)
    assert enc.parts["values"].numel() == 1000
    assert enc.parts["indices"].numel() <= 2 * 1000 + 2  # gaps of ~100 need one or two bytes
    assert enc.nbytes < 0.02 * 4 * x.numel()


# ------------------------------------------------------------------------------------------------- sign
def test_sign_sends_one_bit_per_element_and_the_mean_magnitude() -> None:
    x = torch.tensor([0.5, -2.0, 0.0, 1.5, -0.25])
    enc = Sign().encode(x)
    out = Sign().decode(enc)
    scale = x.abs().mean()
    torch.testing.assert_close(out, scale * torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0]))
    assert enc.nbytes == 1 + 4
    assert math.isclose(float(out.abs().sum()), float(x.abs().sum()), rel_tol=1e-6)  # l1 norm kept


# ---------------------------------------------------------------------------------------------- lowrank
def test_lowrank_is_the_truncated_svd_of_the_matrix_view_and_exact_at_full_rank() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64)
    codec = LowRank(rank=4)
    enc = codec.encode(x, CTX)
    assert enc.parts["values"].numel() == 4 * (16 + 72) and enc.nbytes == 4 * 4 * (16 + 72)
    u, s, vh = torch.linalg.svd(x.view(16, 72), full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    out = codec.decode(enc).double()
    assert out.shape == x.shape
    assert torch.allclose(out.view(16, 72), best, atol=1e-5, rtol=1e-5)  # Eckart-Young: the best rank-4 fit
    low = (torch.randn(16, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 72, generator=g, dtype=torch.float64))
    back = codec.decode(codec.encode(low.view(16, 8, 3, 3), CTX)).double().view(16, 72)
    assert torch.allclose(back, low, atol=1e-5 * float(low.abs().max()))  # rank 3 <= 4: exact up to fp32


def test_lowrank_sends_small_tensors_unchanged_and_is_deterministic() -> None:
    codec = LowRank(rank=4)
    for shape in [(10,), (), (4, 4), (3, 1000)]:  # 1-D, scalar, factors no smaller, rank capped at 3 rows
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        out = codec.decode(codec.encode(x, CTX))
        assert out.shape == x.shape and torch.allclose(out, x, atol=1e-5)
    assert codec.factors((3, 1000)) is None and codec.factors((64, 512)) == (64, 512, 4)
    vector = torch.ones(10)
    enc = codec.encode(vector, CTX)
    back = codec.decode(enc)
    vector.add_(1)
    back.mul_(3)
    assert torch.equal(enc.parts["values"], torch.ones(10))  # nothing aliases the input or the output
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    a, b = codec.encode(x, CTX), codec.encode(x.clone(), CODEC_OTHER_CTX)
    assert torch.equal(a.parts["values"], b.parts["values"])  # no randomness, signs fixed


def test_lowrank_composes_with_qsgd_and_must_come_first() -> None:
    chain = parse_chain("lowrank(rank=2)+qsgd(bits=8,block=64)")
    x = torch.randn(32, 16, 7, 7, generator=torch.Generator().manual_seed(4))
    enc = chain.encode(x, CTX)
    values = 2 * (32 + 784)
    assert enc.nbytes == values + 4 * math.ceil(values / 64)
    assert chain.part_numels(x.numel(), tuple(x.shape)) == {"levels": values, "scales": math.ceil(values / 64)}
    exact = LowRank(2).decode(LowRank(2).encode(x, CTX))
    assert float((chain.decode(enc) - exact).abs().max()) < 0.05 * float(exact.abs().max())
    with pytest.raises(ValueError, match="must come first"):
        parse_chain("qsgd(bits=8)+lowrank(rank=2)")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        parse_chain("lowrank(rank=0)")


def test_lowrank_kernel_layout_factors_each_filter_slice_over_the_kernel_taps() -> None:
    g = torch.Generator().manual_seed(5)
    codec = parse_codec("lowrank(rank=3, layout=kernel)")
    assert codec.descriptor() == "lowrank(rank=3,layout=kernel)" and parse_codec(codec.descriptor()) == codec
    assert LowRank(rank=3).descriptor() == "lowrank(rank=3)"  # the default layout keeps its old descriptor
    assert codec.factors((32, 16, 7, 7)) == (512, 49, 3) and codec.factors((64, 512)) == (64, 512, 3)
    assert codec.factors((8, 3, 1, 1)) is None  # 1x1 taps: a rank-1 view, nothing to shrink
    # a kernel whose taps span 3 shapes (rank 3 in the kernel view, full rank in PowerSGD's) comes back exactly
    taps = torch.randn(3, 49, generator=g, dtype=torch.float64)
    x = (torch.randn(32 * 16, 3, generator=g, dtype=torch.float64) @ taps).view(32, 16, 7, 7)
    out = codec.decode(codec.encode(x, CTX)).double()
    assert out.shape == x.shape and torch.allclose(out, x, atol=1e-5 * float(x.abs().max()))
    assert codec.encode(x, CTX).parts["values"].numel() == 3 * (512 + 49)
    assert float((LowRank(rank=3).decode(LowRank(rank=3).encode(x, CTX)).double() - x).norm()) > 0.1 * float(x.norm())
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(noisy.view(512, 49), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young in the kernel view
    assert torch.allclose(codec.decode(codec.encode(noisy, CTX)).double().view(512, 49), best, atol=1e-4)
    with pytest.raises(ValueError, match="layout must be one of out, kernel"):
        parse_codec("lowrank(rank=2, layout=spatial)")


def test_lowrank_decoder_refuses_malformed_factors() -> None:
    codec = LowRank(rank=2)
    enc = codec.encode(torch.randn(8, 20), CTX)
    short = dict(enc.parts, values=enc.parts["values"][:-1])
    with pytest.raises(ValueError, match="values"):
        codec.decode(type(enc)(enc.codec, enc.shape, short))
    bad = enc.parts["values"].clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        codec.decode(type(enc)(enc.codec, enc.shape, {"values": bad}))


# ------------------------------------------------------------------------------------------------ chains
def test_chain_applies_later_codecs_to_the_kept_values() -> None:
    x = _x(20_000).view(200, 100)
    chain = parse_chain(["topk(frac=0.01)", "qsgd(bits=8", "block=256)"])  # a YAML flow list split at ", "
    assert chain.descriptor() == "topk(frac=0.01)+qsgd(bits=8,block=256)"
    enc = chain.encode(x, CTX)
    assert list(enc.parts) == ["indices", "levels", "scales"]
    topk = TopK(frac=0.01).decode(TopK(frac=0.01).encode(x))
    out = chain.decode(enc)
    support = topk != 0
    assert torch.equal(out != 0, support) or int((out[support] == 0).sum()) < 3  # a value may round to 0
    assert int((out[~support] != 0).sum()) == 0
    step = topk.abs().max() / 127
    assert float((out - topk).abs().max()) <= float(step) * (1 + 1e-5)
    assert enc.nbytes == enc.parts["indices"].numel() + 200 + 4 * 1  # 200 kept values at 8 bits, one block


@pytest.mark.parametrize("spec", ["bf16", "fp16", "cast(dtype=fp16)", "qsgd(bits=4)", "qsgd(bits=6, block=64)",
                                  "topk(frac=0.05)", "topk(k=3)", "sign", "none", "[topk(frac=0.1), sign]",
                                  "topk(frac=0.01) + qsgd(bits=8, block=256)", "topk(k=9)+bf16",
                                  "lowrank(rank=3)", "lowrank(rank=2)+qsgd(bits=4, block=64)",
                                  "qsgd(bits=3, rounding=nearest)",
                                  "lowrank(rank=7)+qsgd(bits=4,block=256,rounding=nearest)",
                                  "lowrank(rank=2, layout=kernel)+qsgd(bits=3, block=64, rounding=nearest, "
                                  "entropy=deflate)", "qsgd(bits=8, entropy=deflate)",
                                  "qsgd(bits=3, block=64, scales=bf16)"])
def test_descriptors_parse_back_to_the_same_chain_and_bytes_round_trip(spec: str) -> None:
    chain = parse_chain(spec)
    assert parse_chain(chain.descriptor()) == chain
    x = _x(3000).view(30, 100)
    enc = chain.encode(x, CTX)
    assert enc.codec == chain.descriptor()
    back = chain.from_bytes(chain.to_bytes(enc), enc.shape)
    assert torch.equal(chain.decode(back), chain.decode(enc))
    counts = chain.part_numels(x.numel(), enc.shape)
    assert all(n is None or enc.parts[k].numel() == n for k, n in counts.items()) and list(counts) == list(enc.parts)


@pytest.mark.parametrize(("spec", "needle"), [
    ("zip", "unknown codec 'zip'"),
    ("qsgd(bitz=4)", "unknown parameter 'bitz'"),
    ("qsgd(bits=1)", "bits must be an integer in 2..8"),
    ("qsgd(bits=4.5)", "bits must be an integer"),
    ("qsgd(bits=4, block=0)", "block must be a positive"),
    ("qsgd(bits=4, rounding=floor)", "rounding must be one of stochastic, nearest, got 'floor'"),
    ("qsgd(bits=4, entropy=zstd)", "entropy must be one of none, deflate, got 'zstd'"),
    ("qsgd(bits=4, scales=fp16)", "scales must be one of fp32, bf16, got 'fp16'"),
    ("topk(frac=0)", "frac must be in"),
    ("topk(frac=0.1, k=3)", "exactly one of frac or k"),
    ("topk()", "exactly one of frac or k"),
    ("topk(frac=abc)", "must be a number"),
    ("cast(dtype=fp8)", "bf16 or fp16"),
    ("sign(scale=1)", "unknown parameter 'scale'"),
    ("qsgd(bits=4)+topk(k=3)", "leaves no values"),
    ("topk(k=3)+topk(k=2)", "both send 'indices'"),
    ("topk(k=3", "unbalanced"),
])
def test_bad_chains_are_one_line_value_errors(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")) as err:
        parse_chain(spec)
    assert "\n" not in str(err.value)


def test_decoding_refuses_a_payload_of_another_chain() -> None:
    enc = parse_chain("qsgd(bits=4)").encode(_x(100), CTX)
    with pytest.raises(ValueError, match="expected 'qsgd\\(bits=8\\)'"):
        parse_chain("qsgd(bits=8)").decode(enc)
    with pytest.raises(TypeError, match="float"):
        Chain([QSGD(4)]).encode(torch.arange(4))


def test_collective_payloads_refuse_wrong_lengths() -> None:
    chain = parse_chain("topk(frac=0.1)+qsgd(bits=4,block=32)")
    enc = chain.encode(_x(640), CTX)
    data = chain.to_bytes(enc)
    assert data.numel() == enc.nbytes + 4  # the index stream's length prefix
    for bad in (data[:-1], torch.cat([data, data[:3]]), data[:2], torch.zeros(0, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="payload"):
            chain.from_bytes(bad, enc.shape)
    huge = data.clone()
    huge[:4] = torch.tensor([255, 255, 255, 127], dtype=torch.uint8)  # an index stream longer than the payload
    with pytest.raises(ValueError, match="ends inside part 'indices'"):
        chain.from_bytes(huge, enc.shape)
