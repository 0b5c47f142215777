"""Loss registry against torch's own functions and the focal-loss formula written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from launcher.config.losses import BCE, MAE, MSE, CrossEntropy, Focal, Huber
from launcher.config.tasks import TASKS
from launcher.train.losses import LossContext, build_loss, class_weights_from_counts

torch.manual_seed(0)
LOGITS = torch.randn(6, 3)
TARGETS = torch.tensor([0, 2, 1, 1, 0, 2])


def task(name: str) -> LossContext:
    return LossContext(TASKS[name])


def test_cross_entropy_sum_with_smoothing_and_weights():
    weights = [0.5, 1.0, 2.0]
    fn = build_loss(
        CrossEntropy(name="cross_entropy", label_smoothing=0.1, class_weights=weights), task("sequence_classification")
    )
    reference = F.cross_entropy(LOGITS, TARGETS, weight=torch.tensor(weights), label_smoothing=0.1, reduction="none")
    assert fn(LOGITS, TARGETS).item() == pytest.approx(reference.sum().item(), rel=1e-6)


def test_auto_class_weights_are_sklearn_balanced():
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 90 + [1] * 10)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    assert class_weights_from_counts([90, 10]) == pytest.approx(expected.tolist())


def test_causal_lm_shifts_and_ignores_masked_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    fn = build_loss(CrossEntropy(name="cross_entropy"), task("causal_lm"))
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="sum")
    assert fn(logits, labels).item() == pytest.approx(reference.item(), rel=1e-6)


def test_focal_multiclass_formula_and_gamma_zero_is_cross_entropy():
    fn = build_loss(Focal(name="focal", gamma=2.0), task("sequence_classification"))
    p = LOGITS.softmax(-1)[torch.arange(6), TARGETS]
    assert fn(LOGITS, TARGETS).item() == pytest.approx((-((1 - p) ** 2) * p.log()).sum().item(), rel=1e-5)
    plain = build_loss(Focal(name="focal", gamma=0.0), task("sequence_classification"))
    assert plain(LOGITS, TARGETS).item() == pytest.approx(
        F.cross_entropy(LOGITS, TARGETS, reduction="sum").item(), rel=1e-5
    )


def test_focal_multi_label_with_alpha():
    logits, labels = torch.randn(4, 3), torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    fn = build_loss(Focal(name="focal", gamma=1.5, alpha=0.25), task("multi_label_classification"))
    p = logits.sigmoid()
    p_t = p * labels + (1 - p) * (1 - labels)
    alpha_t = 0.25 * labels + 0.75 * (1 - labels)
    expected = (-alpha_t * (1 - p_t) ** 1.5 * p_t.log()).mean(-1).sum()
    assert fn(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bce_with_pos_weight_matches_torch_mean_per_example():
    logits, labels = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    fn = build_loss(BCE(name="bce", pos_weight=[1.0, 2.0, 3.0]), task("multi_label_classification"))
    reference = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=torch.tensor([1.0, 2.0, 3.0]))
    assert fn(logits, labels).item() / 4 == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(
    "cfg,reference",
    [
        (MSE(name="mse"), lambda p, y: F.mse_loss(p, y)),
        (MAE(name="mae"), lambda p, y: F.l1_loss(p, y)),
        (Huber(name="huber", delta=0.5), lambda p, y: F.huber_loss(p, y, delta=0.5)),
    ],
)
def test_regression_losses(cfg, reference):
    preds, targets = torch.randn(8, 1), torch.randn(8)
    fn = build_loss(cfg, task("regression"))
    assert fn(preds, targets).item() / 8 == pytest.approx(reference(preds.reshape(-1), targets).item(), rel=1e-6)
