"""Metric registry on accumulated evaluation statistics: metric name → function (NumPy; checked against
scikit-learn).

Evaluation never keeps a split's logits. Each batch is folded into `EvalOutputs` as it is scored: a
confusion matrix (single-label classes and token tags), per-label counts (multi-label), running sums of the
errors (regression) and of the loss, so memory does not grow with the eval set. ROC-AUC alone needs every
row, and keeps only its scores: one float32 per row (binary) or per row and class, with the labels as small
integers. Each rank accumulates its share, the states are gathered (kilobytes) and merged, and the metrics
are computed once on the whole split, so they do not depend on the world size.

Which metrics fit a task is the task registry's business (config.tasks); a metric here only reads the
statistics it needs: `out.counts` (class counts), `out.sums` (named running sums: regression errors, the
pairs of preference and reward-model tasks), `out.scores` (ROC-AUC).
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
    """What one split's evaluation has accumulated, batch by batch (`add`) and rank by rank (`merge`).

    Constant size except `scores`, kept only when `keep_scores` (a metric marked `needs_scores`: ROC-AUC).
    `EvalOutputs(task, probs=..., labels=...)` (or `preds=` for regression) folds whole arrays in at once.
    """

    task: str
    loss_sum: float = 0.0
    loss_count: float = 0.0
    probs: np.ndarray | None = None  # [N, C] softmax or [N, K] sigmoid: folded in, then dropped
    labels: np.ndarray | None = None  # [N] class ids, [N, K] multi-hot, or [N] targets
    preds: np.ndarray | None = None  # regression predictions
    label_names: list[str] = field(default_factory=list)
    keep_scores: bool = True
    confusion: np.ndarray | None = None  # [C, C] int64, true class × predicted class
    label_counts: np.ndarray | None = None  # multi-label: [4, K] int64, the rows tp, fp, fn, support
    sums: dict[str, float] = field(default_factory=dict)  # named running sums (rows, errors, a task's own)
    score_parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (scores, labels) per batch

    def __post_init__(self):
        if self.probs is not None or self.preds is not None:
            self.add((self.probs if self.probs is not None else self.preds, self.labels))
            self.probs = self.preds = self.labels = None

    @property
    def label_kind(self) -> str:
        return TASKS[self.task].label

    @property
    def multi_label(self) -> bool:
        return self.label_kind == "multi_hot"

    def add(self, kept) -> None:
        """One batch's outputs, as the task hooks' eval_outputs returns them: (probabilities or predictions,
        labels), a dict of named sums (added to `sums`), or None (the loss alone is scored)."""
        if kept is None:
            return
        if isinstance(kept, dict):
            for name, value in kept.items():
                self.sums[name] = self.sums.get(name, 0.0) + float(value)
            return
        values, labels = np.asarray(kept[0]), np.asarray(kept[1])
        if self.label_kind == "number":
            errors = values.astype(np.float64).reshape(-1) - labels.astype(np.float64).reshape(-1)
            self.add({"rows": errors.size, "abs_error": np.abs(errors).sum(), "squared_error": (errors**2).sum()})
            return
        if self.multi_label:
            preds, truth = (values >= 0.5).astype(np.int64), labels.astype(np.int64)
            counts = np.stack(
                [(preds & truth).sum(0), (preds & (1 - truth)).sum(0), ((1 - preds) & truth).sum(0), truth.sum(0)]
            )
            self.label_counts = counts if self.label_counts is None else self.label_counts + counts
            self.add({"rows": len(truth), "exact": float((preds == truth).all(axis=1).sum())})
            scores, score_labels = values, truth.astype(np.uint8)
        else:
            num_classes = values.shape[1]
            matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
            np.add.at(matrix, (labels.astype(np.int64), values.argmax(axis=1)), 1)
            self.confusion = matrix if self.confusion is None else self.confusion + matrix
            scores = values[:, 1] if num_classes == 2 else values  # binary: the positive class only
            score_labels = labels.astype(np.int32)
        if self.keep_scores:
            self.score_parts.append((np.asarray(scores, dtype=np.float32), score_labels))

    def merge(self, other: EvalOutputs) -> None:
        """Fold in another rank's accumulated outputs."""
        self.loss_sum += other.loss_sum
        self.loss_count += other.loss_count
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        if other.confusion is not None:
            self.confusion = other.confusion if self.confusion is None else self.confusion + other.confusion
        if other.label_counts is not None:
            self.label_counts = (
                other.label_counts if self.label_counts is None else self.label_counts + other.label_counts
            )
        self.score_parts += other.score_parts

    @property
    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """ROC-AUC's scores and labels of the whole split (rank order: AUC does not depend on it)."""
        return np.concatenate([s for s, _ in self.score_parts]), np.concatenate([y for _, y in self.score_parts])

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulated statistics (what a rank gathers)."""
        arrays = [a for a in (self.confusion, self.label_counts) if a is not None]
        arrays += [a for part in self.score_parts for a in part]
        return sum(a.nbytes for a in arrays) + 16 * len(self.sums)

    @cached_property
    def counts(self) -> ClassCounts:
        if self.multi_label:
            tp, fp, fn, support = self.label_counts
            rows = self.sums.get("rows", 0.0)
            return ClassCounts(tp, fp, fn, support, self.sums.get("exact", 0.0) / rows if rows else float("nan"))
        matrix = self.confusion
        tp = np.diag(matrix)
        total = matrix.sum()
        return ClassCounts(
            tp=tp,
            fp=matrix.sum(0) - tp,
            fn=matrix.sum(1) - tp,
            support=matrix.sum(1),
            accuracy=float(tp.sum() / total) if total else float("nan"),
        )


def needs_scores(metric: Callable[[EvalOutputs], dict]) -> Callable[[EvalOutputs], dict]:
    """Marks a metric that needs every row's scores (EvalOutputs keeps them only when one is asked for)."""
    metric.needs_scores = True
    return metric


def binary_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney U statistic (ties get average ranks)."""
    y_true = y_true.astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average rank of each run of tied scores, without a Python loop over rows
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
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


@needs_scores
def roc_auc(out: EvalOutputs) -> dict:
    """Macro one-vs-rest over classes (multi-label: over labels); binary: the positive class."""
    scores, labels = out.scores
    if out.multi_label:
        columns = [binary_auc(labels[:, k], scores[:, k]) for k in range(scores.shape[1])]
    elif scores.ndim == 1:
        columns = [binary_auc(labels == 1, scores)]
    else:
        columns = [binary_auc(labels == k, scores[:, k]) for k in range(scores.shape[1])]
    valid = [c for c in columns if not math.isnan(c)]
    return {"roc_auc": float(np.mean(valid)) if valid else float("nan")}


def mae(out: EvalOutputs) -> dict:
    return {"mae": out.sums["abs_error"] / out.sums["rows"]}


def rmse(out: EvalOutputs) -> dict:
    return {"rmse": math.sqrt(out.sums["squared_error"] / out.sums["rows"])}


def perplexity(out: EvalOutputs) -> dict:
    return {"perplexity": float(math.exp(min(out.loss_sum / max(out.loss_count, 1.0), 50.0)))}


# Pair tasks (preference, reward_model) fold each batch into named sums (train.tasks.Pairs.evaluate calls
# pair_sums): the pairs, the wins, the reward margin and the answers' summed log-probabilities.
def pair_sums(rewards: np.ndarray, logps: np.ndarray | None = None) -> dict[str, float]:
    """One batch of pairs, columns (chosen, rejected) of [N, 2] arrays: a win is a pair whose chosen answer has
    the higher reward, a tie counts half (an untrained DPO policy, equal to its reference, scores 0.5)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    sums = {
        "pairs": float(len(rewards)),
        "wins": float(((rewards[:, 0] > rewards[:, 1]) + 0.5 * (rewards[:, 0] == rewards[:, 1])).sum()),
        "reward_margin": float((rewards[:, 0] - rewards[:, 1]).sum()),
    }
    if logps is not None:
        logps = np.asarray(logps, dtype=np.float64)
        sums.update(chosen_logps=float(logps[:, 0].sum()), rejected_logps=float(logps[:, 1].sum()))
    return sums


def _per_pair(out: EvalOutputs, name: str) -> float:
    return out.sums[name] / out.sums["pairs"]


def reward_accuracy(out: EvalOutputs) -> dict:
    return {"reward_accuracy": _per_pair(out, "wins")}


def reward_margin(out: EvalOutputs) -> dict:
    return {"reward_margin": _per_pair(out, "reward_margin")}


def logps(out: EvalOutputs) -> dict:
    return {"chosen_logps": _per_pair(out, "chosen_logps"), "rejected_logps": _per_pair(out, "rejected_logps")}


def pairwise_accuracy(out: EvalOutputs) -> dict:
    return {"pairwise_accuracy": _per_pair(out, "wins")}


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


def keeps_scores(names: list[str]) -> bool:
    return any(getattr(METRICS[name], "needs_scores", False) for name in names)


def compute(out: EvalOutputs, names: list[str]) -> dict:
    """The split's mean loss per loss term, then each named metric, in the order named."""
    result = {"loss": out.loss_sum / max(out.loss_count, 1.0)}
    for name in names:
        result.update(METRICS[name](out))
    return result


def reported(task: str, names: list[str], num_labels: int) -> list[str]:
    """The numbers an evaluation of `task` with metrics `names` reports ("loss", "accuracy", "f1_macro", ...):
    what train.early_stopping and train.keep_best may watch. Found by computing the metrics on two made-up
    rows, so a new metric needs no second table."""
    kind, classes = TASKS[task].label, max(num_labels, 2)
    out = EvalOutputs(task, loss_sum=1.0, loss_count=1.0)
    if kind in ("class", "tags"):
        out.add((np.eye(classes)[[0, 1]], np.array([0, 1])))
    elif kind == "multi_hot":
        out.add((np.eye(classes)[[0, 1]], np.eye(classes)[[0, 1]]))
    elif kind == "number":
        out.add((np.array([0.0, 1.0]), np.array([0.0, 2.0])))
    else:  # "none": causal LM and chat (the loss alone), or pairs (named sums)
        out.add(pair_sums(np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros((2, 2))))
    keys = ["loss"]
    for name in names:
        try:
            values = METRICS[name](out)
        except (KeyError, IndexError, TypeError, ValueError):  # reads a statistic its task's hooks provide
            continue
        keys += [key for key, value in values.items() if isinstance(value, (int, float))]
    return keys
