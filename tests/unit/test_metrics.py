"""Metrics against scikit-learn on random predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as sk

from launcher.train.metrics import EvalOutputs, compute

RNG = np.random.default_rng(0)


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_single_label_classification(num_classes):
    labels = RNG.integers(0, num_classes, 300)
    probs = softmax(RNG.normal(size=(300, num_classes)) + np.eye(num_classes)[labels] * 1.0)
    probs[:3] = probs[3]  # ties in scores
    out = EvalOutputs("sequence_classification", probs=probs, labels=labels)
    got = compute(out, ["accuracy", "precision", "recall", "f1", "per_class", "roc_auc"])
    preds = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(labels, preds))
    assert got["precision_macro"] == pytest.approx(sk.precision_score(labels, preds, average="macro", zero_division=0))
    assert got["recall_macro"] == pytest.approx(sk.recall_score(labels, preds, average="macro", zero_division=0))
    assert got["f1_macro"] == pytest.approx(sk.f1_score(labels, preds, average="macro", zero_division=0))
    per_class_f1 = sk.f1_score(labels, preds, average=None, zero_division=0)
    assert [got["per_class"][str(k)]["f1"] for k in range(num_classes)] == pytest.approx(per_class_f1.tolist())
    expected_auc = (
        sk.roc_auc_score(labels, probs[:, 1])
        if num_classes == 2
        else sk.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert got["roc_auc"] == pytest.approx(expected_auc)


def test_multi_label_classification():
    labels = RNG.integers(0, 2, (200, 3))
    probs = 1 / (1 + np.exp(-(RNG.normal(size=(200, 3)) + labels * 1.5 - 0.75)))
    got = compute(EvalOutputs("multi_label_classification", probs=probs, labels=labels), ["accuracy", "f1", "roc_auc"])
    preds = (probs >= 0.5).astype(int)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(labels, preds))
    assert got["f1_macro"] == pytest.approx(sk.f1_score(labels, preds, average="macro", zero_division=0))
    assert got["roc_auc"] == pytest.approx(sk.roc_auc_score(labels, probs, average="macro"))


def test_regression():
    targets, preds = RNG.normal(size=100), RNG.normal(size=100)
    got = compute(EvalOutputs("regression", preds=preds, labels=targets), ["mae", "rmse"])
    assert got["mae"] == pytest.approx(sk.mean_absolute_error(targets, preds))
    assert got["rmse"] == pytest.approx(math.sqrt(sk.mean_squared_error(targets, preds)))


def test_perplexity_is_exp_of_mean_token_loss():
    got = compute(EvalOutputs("causal_lm", loss_sum=230.0, loss_count=100.0), ["perplexity"])
    assert got["perplexity"] == pytest.approx(math.exp(2.3)) and got["loss"] == pytest.approx(2.3)
