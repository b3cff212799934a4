"""KD and attention-transfer losses: hand-computed values, frozen teacher, one-forward students of every kind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models
from pipeline.config import ATConfig, KDConfig, NoDistill, TrainConfig
from pipeline.distill import at_loss, at_map, at_total, build_loss, kd_loss
from pipeline.train import build_optimizer, cross_entropy_loss, fit


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


def test_kd_loss_matches_hand_computation() -> None:
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    t = [[0.0, 1.0, 3.0], [2.0, 2.0, -2.0]]
    y = [1, 2]
    T, alpha = 2.0, 0.3
    ce = sum(-math.log(_softmax(si)[yi]) for si, yi in zip(s, y, strict=True)) / 2
    kl = 0.0
    for si, ti in zip(s, t, strict=True):
        ps, pt = _softmax([a / T for a in si]), _softmax([a / T for a in ti])
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    expected = (1 - alpha) * ce + alpha * T * T * kl / 2  # batch-mean KL
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T=T, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_limits() -> None:
    s, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert kd_loss(s, s.clone(), y, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)  # KL(p || p) = 0
    assert kd_loss(s, torch.randn(4, 10), y, alpha=0.0).item() == pytest.approx(F.cross_entropy(s, y).item())
    with pytest.raises(ValueError, match="differ"):
        kd_loss(s, torch.randn(4, 100), y)


def test_at_map_and_loss_hand_computed() -> None:
    student = torch.ones(1, 2, 2, 2)  # mean_c(A^2) = [1, 1, 1, 1] -> normalised [.5, .5, .5, .5]
    teacher = torch.zeros(1, 1, 2, 2)
    teacher[0, 0, 0, 0] = 2.0  # mean_c(A^2) = [4, 0, 0, 0] -> [1, 0, 0, 0]
    torch.testing.assert_close(at_map(student), torch.full((1, 4), 0.5))
    torch.testing.assert_close(at_map(teacher), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # differences [-.5, .5, .5, .5] -> squared mean 0.25 per map; two maps -> 0.5
    assert at_loss([student], [teacher]).item() == pytest.approx(0.25)
    assert at_loss([student, student], [teacher, teacher]).item() == pytest.approx(0.5)
    logits, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    assert at_total(logits, y, [student], [teacher], beta=1000.0).item() == pytest.approx(math.log(2) + 125.0)


def test_at_pools_to_the_smaller_spatial_size() -> None:
    teacher = torch.rand(2, 3, 2, 2)
    # A student map whose 2x2-pooled channel-mean of squares equals the teacher's: each pixel repeated 2x2.
    student = teacher.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert at_map(student).shape == (2, 16)
    assert at_loss([student], [teacher]).item() == pytest.approx(0.0, abs=1e-12)
    assert at_loss([teacher], [student]).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="student maps"):
        at_loss([student], [teacher, teacher])


def tiny_pair(block: str = "G(4)") -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = models.build("wrn-10-1", num_classes=5)
    student = models.build("wrn-10-1", num_classes=5, block=block)
    return teacher, student


def test_at_is_zero_for_equal_features_and_grad_reaches_only_the_student() -> None:
    teacher, _ = tiny_pair()
    student = models.build_from_spec(models.model_spec(teacher))
    student.load_state_dict(teacher.state_dict())
    teacher.train()  # build_loss must force eval mode; student in eval mode too, so features are identical
    loss_fn = build_loss(ATConfig(beta=1000.0), teacher)
    student.eval()
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    loss, logits = loss_fn(student, x, y)
    assert not teacher.training
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)  # AT term = 0
    feats_s, feats_t = student.forward_features(x), teacher.forward_features(x)
    assert at_loss(feats_s, feats_t).item() == pytest.approx(0.0, abs=1e-10)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_at_layers_select_feature_maps() -> None:
    teacher, student = tiny_pair()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    full, _ = build_loss(ATConfig(beta=2.0), teacher)(student, x, y)
    only_last, logits = build_loss(ATConfig(beta=2.0, layers=[2]), teacher)(student, x, y)
    s_feats, t_feats = student(x, return_features=True)[1], teacher(x, return_features=True)[1]
    torch.testing.assert_close(only_last, F.cross_entropy(logits, y) + at_loss(s_feats[2:], t_feats[2:]))
    assert full.item() > only_last.item()
    with pytest.raises(ValueError, match="out of range"):
        build_loss(ATConfig(layers=[3]), teacher)(student, x, y)


def test_build_loss_ce_and_errors() -> None:
    assert build_loss(NoDistill(), None) is cross_entropy_loss
    assert build_loss(None, None) is cross_entropy_loss
    with pytest.raises(ValueError, match="needs a teacher"):
        build_loss(KDConfig(), None)


def test_kd_step_on_cheap_student_lowers_kd_loss() -> None:
    teacher, student = tiny_pair("G(4)")
    loss_fn = build_loss(KDConfig(T=4.0, alpha=0.9), teacher)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.0)
    before, _ = loss_fn(student, x, y)
    for _ in range(3):
        loss, _ = loss_fn(student, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = loss_fn(student, x, y)
    assert after.item() < before.item()


@pytest.mark.parametrize("distill", [KDConfig(), ATConfig()])
def test_teacher_is_bit_identical_after_an_epoch_and_has_no_optimizer_state(distill) -> None:
    teacher, student = tiny_pair("B(2)")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loader = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(3)]
    optimizer = build_optimizer(student, TrainConfig(lr=0.1))
    history = fit(student, loader, TrainConfig(lr=0.1, epochs=1), loss_fn=build_loss(distill, teacher),
                  optimizer=optimizer)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not teacher_ids & {id(p) for p in optimizer.state}
    assert len(optimizer.state) > 0  # the student's momentum buffers exist
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def _expanded(net: torch.nn.Module) -> torch.nn.Module:
    return models.expand(net, "cl", rate=2)


def _csg(net: torch.nn.Module) -> torch.nn.Module:
    return models.csg_compress(net, slice_shape=(16, 16, 3, 3), code_size=16)


@pytest.mark.parametrize("compress", [_expanded, _csg], ids=["expandnet", "csg"])
@pytest.mark.parametrize("distill", [KDConfig(), ATConfig()], ids=["kd", "at"])
def test_expanded_and_csg_students_distill_like_their_compact_net(compress, distill) -> None:
    teacher, _ = tiny_pair()
    torch.manual_seed(1)
    student = compress(models.build("wrn-10-1", num_classes=5))
    compact = models.finalize(student)
    loss_fn = build_loss(distill, teacher)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    student.eval()
    compact.eval()
    loss, logits = loss_fn(student, x, y)
    ref, ref_logits = loss_fn(compact, x, y)  # the loss sees the same logits and features as the compact net
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    loss.backward()
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in teacher.parameters())
