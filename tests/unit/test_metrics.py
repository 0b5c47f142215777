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


def accumulated(task: str, values: np.ndarray, labels: np.ndarray, ranks: int, batch: int, **kw) -> EvalOutputs:
    """Each of `ranks` ranks folds its strided share in batches of `batch`; rank 0 merges the others."""
    parts = []
    for rank in range(ranks):
        out = EvalOutputs(task, **kw)
        mine_v, mine_y = values[rank::ranks], labels[rank::ranks]
        for start in range(0, len(mine_v), batch):
            out.add((mine_v[start : start + batch], mine_y[start : start + batch]))
        parts.append(out)
    for part in parts[1:]:
        parts[0].merge(part)
    return parts[0]


@pytest.mark.parametrize(
    "task,names",
    [
        ("sequence_classification", ["accuracy", "precision", "recall", "f1", "per_class", "roc_auc"]),
        ("multi_label_classification", ["accuracy", "f1", "roc_auc"]),
        ("regression", ["mae", "rmse"]),
    ],
)
def test_batches_over_ranks_give_the_whole_split_result(task, names):
    """Accumulated per batch on 3 ranks and merged: the same numbers as the whole split at once."""
    n = 301
    if task == "sequence_classification":
        labels = RNG.integers(0, 4, n)
        values = softmax(RNG.normal(size=(n, 4)) + np.eye(4)[labels])
    elif task == "multi_label_classification":
        labels = RNG.integers(0, 2, (n, 3))
        values = 1 / (1 + np.exp(-(RNG.normal(size=(n, 3)) + labels - 0.5)))
    else:
        labels, values = RNG.normal(size=n), RNG.normal(size=n)
    arrays = {"preds": values} if task == "regression" else {"probs": values}
    whole = compute(EvalOutputs(task, labels=labels, **arrays), names)
    got = compute(accumulated(task, values, labels, ranks=3, batch=16), names)
    assert got.pop("per_class", None) == whole.pop("per_class", None)  # counts: exact
    assert got == pytest.approx(whole, rel=1e-6)


def test_statistics_do_not_grow_with_the_split_and_roc_auc_keeps_scores_only():
    """Counts are constant-size; with ROC-AUC asked for, 4 bytes per row (binary: the positive class only)."""

    def size(n: int, keep_scores: bool) -> int:
        labels = RNG.integers(0, 2, n)
        probs = softmax(RNG.normal(size=(n, 2)))
        return accumulated("sequence_classification", probs, labels, 2, 64, keep_scores=keep_scores).nbytes

    assert size(1000, False) == size(100_000, False) < 100
    assert size(100_000, True) - size(1000, True) == (100_000 - 1000) * (4 + 4)  # float32 score + int32 label
    # token classification: a batch of 5,000 tokens folds into a 3 × 3 confusion matrix
    tags = RNG.integers(0, 3, 5000)
    out = EvalOutputs("token_classification", probs=softmax(RNG.normal(size=(5000, 3))), labels=tags)
    assert out.confusion.shape == (3, 3) and out.confusion.sum() == 5000 and out.probs is None


def test_a_task_hook_may_add_named_sums_for_its_own_metric():
    out = EvalOutputs("regression", keep_scores=False)
    out.add({"correct": 3, "pairs": 4})
    out.add({"correct": 2, "pairs": 4})
    assert out.sums == {"correct": 5.0, "pairs": 8.0}
