"""Metric registry on gathered predictions: metric name → function (NumPy; checked against scikit-learn).

Evaluation gathers every rank's outputs to one place and computes metrics
once on the whole split, so they do not depend on the world size. Which
metrics fit a task is the task registry's business (config.tasks); a metric
here only reads the outputs it needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from launcher.config.tasks import TASKS


@dataclass
class ClassCounts:
    """Per-class true positives, false positives, false negatives and support, and exact-match accuracy."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    support: np.ndarray
    accuracy: float

    @cached_property
    def prf(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tp, fp, fn = self.tp, self.fp, self.fn
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
            recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        return precision, recall, f1


@dataclass
class EvalOutputs:
    """What one split's evaluation produced, in the form the task's metrics need."""

    task: str
    loss_sum: float = 0.0
    loss_count: float = 0.0
    probs: np.ndarray | None = None  # [N, C] softmax or [N, K] sigmoid
    labels: np.ndarray | None = None  # [N] class ids, [N, K] multi-hot, or [N] targets
    preds: np.ndarray | None = None  # regression predictions
    label_names: list[str] = field(default_factory=list)

    @property
    def multi_label(self) -> bool:
        return TASKS[self.task].label == "multi_hot"

    @cached_property
    def counts(self) -> ClassCounts:
        probs, labels = self.probs, self.labels
        if self.multi_label:
            preds = (probs >= 0.5).astype(np.int64)
            truth = labels.astype(np.int64)
            return ClassCounts(
                tp=(preds & truth).sum(0),
                fp=(preds & (1 - truth)).sum(0),
                fn=((1 - preds) & truth).sum(0),
                support=truth.sum(0),
                accuracy=float((preds == truth).all(axis=1).mean()),
            )
        preds = probs.argmax(axis=1)
        matrix = np.zeros((probs.shape[1], probs.shape[1]), dtype=np.int64)
        np.add.at(matrix, (labels, preds), 1)
        tp = np.diag(matrix)
        return ClassCounts(
            tp=tp,
            fp=matrix.sum(0) - tp,
            fn=matrix.sum(1) - tp,
            support=matrix.sum(1),
            accuracy=float((preds == labels).mean()),
        )


def binary_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney U statistic (ties get average ranks)."""
    y_true = y_true.astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(out: EvalOutputs) -> dict:
    return {"accuracy": out.counts.accuracy}


def _macro(index: int, name: str) -> Callable[[EvalOutputs], dict]:
    def metric(out: EvalOutputs) -> dict:
        return {f"{name}_macro": float(out.counts.prf[index].mean())}

    return metric


def per_class(out: EvalOutputs) -> dict:
    counts = out.counts
    precision, recall, f1 = counts.prf
    names = out.label_names or [str(i) for i in range(len(counts.tp))]
    return {
        "per_class": {
            names[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(counts.support[i]),
            }
            for i in range(len(counts.tp))
        }
    }


def roc_auc(out: EvalOutputs) -> dict:
    """Macro one-vs-rest over classes (multi-label: over labels); binary: the positive class."""
    probs, labels = out.probs, out.labels
    if out.multi_label:
        columns = [binary_auc(labels[:, k], probs[:, k]) for k in range(probs.shape[1])]
    elif probs.shape[1] == 2:
        columns = [binary_auc(labels == 1, probs[:, 1])]
    else:
        columns = [binary_auc(labels == k, probs[:, k]) for k in range(probs.shape[1])]
    valid = [c for c in columns if not math.isnan(c)]
    return {"roc_auc": float(np.mean(valid)) if valid else float("nan")}


def _errors(out: EvalOutputs) -> np.ndarray:
    return out.preds.astype(np.float64) - out.labels.astype(np.float64)


def mae(out: EvalOutputs) -> dict:
    return {"mae": float(np.abs(_errors(out)).mean())}


def rmse(out: EvalOutputs) -> dict:
    return {"rmse": float(np.sqrt((_errors(out) ** 2).mean()))}


def perplexity(out: EvalOutputs) -> dict:
    return {"perplexity": float(math.exp(min(out.loss_sum / max(out.loss_count, 1.0), 50.0)))}


# Pair tasks (preference, reward_model) keep [N, 2] arrays, columns (chosen, rejected): the rewards in `probs`
# and the answers' summed log-probabilities in `labels` (train.tasks.Preference.evaluate).
def _wins(rewards: np.ndarray) -> float:
    """The fraction of pairs whose chosen answer has the higher reward, ties counted half (an untrained DPO
    policy, equal to its reference, scores 0.5)."""
    return float(((rewards[:, 0] > rewards[:, 1]) + 0.5 * (rewards[:, 0] == rewards[:, 1])).mean())


def reward_accuracy(out: EvalOutputs) -> dict:
    return {"reward_accuracy": _wins(out.probs)}


def reward_margin(out: EvalOutputs) -> dict:
    return {"reward_margin": float((out.probs[:, 0] - out.probs[:, 1]).mean())}


def logps(out: EvalOutputs) -> dict:
    return {"chosen_logps": float(out.labels[:, 0].mean()), "rejected_logps": float(out.labels[:, 1].mean())}


def pairwise_accuracy(out: EvalOutputs) -> dict:
    return {"pairwise_accuracy": _wins(out.probs)}


# metric name (as a recipe writes it) → function of the outputs; total over the task registry's metrics
METRICS: dict[str, Callable[[EvalOutputs], dict]] = {
    "accuracy": accuracy,
    "precision": _macro(0, "precision"),
    "recall": _macro(1, "recall"),
    "f1": _macro(2, "f1"),
    "per_class": per_class,
    "roc_auc": roc_auc,
    "mae": mae,
    "rmse": rmse,
    "perplexity": perplexity,
    "reward_accuracy": reward_accuracy,
    "reward_margin": reward_margin,
    "logps": logps,
    "pairwise_accuracy": pairwise_accuracy,
}


def compute(out: EvalOutputs, names: list[str]) -> dict:
    """The split's mean loss per loss term, then each named metric, in the order named."""
    result = {"loss": out.loss_sum / max(out.loss_count, 1.0)}
    for name in names:
        result.update(METRICS[name](out))
    return result
