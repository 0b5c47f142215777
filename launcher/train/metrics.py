"""Metric registry on gathered predictions (NumPy; checked against scikit-learn in the tests).

Evaluation gathers every rank's outputs to one place and computes metrics
once on the whole split, so they do not depend on the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return precision, recall, f1


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


def classification_metrics(out: EvalOutputs, names: list[str]) -> dict:
    probs, labels = out.probs, out.labels
    multi_label = out.task == "multi_label_classification"
    if multi_label:
        preds = (probs >= 0.5).astype(np.int64)
        truth = labels.astype(np.int64)
        tp = (preds & truth).sum(0)
        fp = (preds & (1 - truth)).sum(0)
        fn = ((1 - preds) & truth).sum(0)
        support = truth.sum(0)
        accuracy = float((preds == truth).all(axis=1).mean())
    else:
        num_classes = probs.shape[1]
        preds = probs.argmax(axis=1)
        matrix = _confusion(labels, preds, num_classes)
        tp = np.diag(matrix)
        fp = matrix.sum(0) - tp
        fn = matrix.sum(1) - tp
        support = matrix.sum(1)
        accuracy = float((preds == labels).mean())
    precision, recall, f1 = _prf(tp, fp, fn)
    result: dict = {}
    wanted = set(names)
    if "accuracy" in wanted:
        result["accuracy"] = accuracy
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        if name in wanted:
            result[f"{name}_macro"] = float(values.mean())
    if "per_class" in wanted:
        labels_named = out.label_names or [str(i) for i in range(len(tp))]
        result["per_class"] = {
            labels_named[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(len(tp))
        }
    if "roc_auc" in wanted:
        if multi_label:
            columns = [binary_auc(labels[:, k], probs[:, k]) for k in range(probs.shape[1])]
        elif probs.shape[1] == 2:
            columns = [binary_auc(labels == 1, probs[:, 1])]
        else:
            columns = [binary_auc(labels == k, probs[:, k]) for k in range(probs.shape[1])]
        valid = [c for c in columns if not math.isnan(c)]
        result["roc_auc"] = float(np.mean(valid)) if valid else float("nan")
    return result


def regression_metrics(out: EvalOutputs, names: list[str]) -> dict:
    errors = out.preds.astype(np.float64) - out.labels.astype(np.float64)
    result = {}
    if "mae" in names:
        result["mae"] = float(np.abs(errors).mean())
    if "rmse" in names:
        result["rmse"] = float(np.sqrt((errors**2).mean()))
    return result


def perplexity(out: EvalOutputs) -> float:
    return float(math.exp(min(out.loss_sum / max(out.loss_count, 1.0), 50.0)))


def compute(out: EvalOutputs, names: list[str]) -> dict:
    result = {"loss": out.loss_sum / max(out.loss_count, 1.0)}
    if out.task in ("sequence_classification", "multi_label_classification", "token_classification"):
        result.update(classification_metrics(out, names))
    elif out.task == "regression":
        result.update(regression_metrics(out, names))
    if "perplexity" in names:
        result["perplexity"] = perplexity(out)
    return result
