"""Error feedback (``pipeline.transport.error_feedback``): nothing is lost, residuals age, state round-trips."""

from __future__ import annotations

import pytest
import torch

from pipeline.transport.codecs import CodecContext, parse_chain
from pipeline.transport.error_feedback import ErrorFeedback


def _updates(rounds: int, n: int = 2000) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(n, generator=gen) for _ in range(rounds)]


@pytest.mark.parametrize("spec", ["topk(frac=0.01)", "sign", "topk(frac=0.05)+qsgd(bits=4)"])
def test_what_was_sent_plus_the_residual_is_everything_ever_produced(spec: str) -> None:
    chain, ef = parse_chain(spec), ErrorFeedback()
    updates = _updates(20)
    sent = torch.zeros(2000)
    for rnd, u in enumerate(updates, start=1):
        comp = ef.compensate("w", u, rnd)
        decoded = chain.decode(chain.encode(comp, CodecContext(round=rnd, name="w")))
        ef.record("w", comp, decoded, rnd)
        sent += decoded
    torch.testing.assert_close(sent + ef.residuals["w"], torch.stack(updates).sum(0), rtol=0, atol=1e-4)


def test_error_feedback_sends_more_of_the_signal_than_plain_topk() -> None:
    """With a fixed direction, plain top-1% only ever sends the same 1%; with EF every coordinate arrives."""
    chain = parse_chain("topk(frac=0.01)")
    u = torch.linspace(0.5, 1.0, 1000)
    ef, plain, with_ef = ErrorFeedback(), torch.zeros(1000), torch.zeros(1000)
    for rnd in range(1, 201):
        plain += chain.decode(chain.encode(u))
        comp = ef.compensate("w", u, rnd)
        dec = chain.decode(chain.encode(comp))
        ef.record("w", comp, dec, rnd)
        with_ef += dec
    assert int((plain != 0).sum()) == 10
    assert int((with_ef != 0).sum()) == 1000


def test_skipped_rounds_age_the_residual_by_the_decay() -> None:
    ef = ErrorFeedback(decay=0.5)
    ef.record("w", torch.ones(3), torch.zeros(3), round=2)
    assert torch.equal(ef.compensate("w", torch.zeros(3), round=3), torch.ones(3))  # next round: no ageing
    assert torch.equal(ef.compensate("w", torch.zeros(3), round=5), torch.full((3,), 0.25))  # 2 rounds skipped
    keep = ErrorFeedback()
    keep.record("w", torch.ones(3), torch.zeros(3), round=2)
    assert torch.equal(keep.compensate("w", torch.zeros(3), round=9), torch.ones(3))
    assert torch.equal(keep.compensate("w", torch.zeros(4), round=3), torch.zeros(4))  # new shape: dropped
    with pytest.raises(ValueError, match="decay"):
        ErrorFeedback(decay=0.0)


def test_state_dict_round_trips_and_refuses_broken_state() -> None:
    ef = ErrorFeedback()
    ef.record("layer.weight", torch.arange(6.0).view(2, 3), torch.zeros(2, 3), round=4)
    state = ef.state_dict()
    assert set(state) == {"residual/layer.weight", "round/layer.weight"}
    back = ErrorFeedback()
    back.load_state_dict(state)
    assert torch.equal(back.residuals["layer.weight"], ef.residuals["layer.weight"])
    assert back.rounds == {"layer.weight": 4}
    assert back.norm() == pytest.approx(float(torch.arange(6.0).norm()))
    with pytest.raises(ValueError, match="lacks its residual or its round"):
        ErrorFeedback().load_state_dict({"residual/a": torch.ones(2)})
    with pytest.raises(ValueError, match="unexpected key"):
        ErrorFeedback().load_state_dict({"momentum/a": torch.ones(2)})
