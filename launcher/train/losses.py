"""Loss registry. Each loss returns the SUM of its terms over a micro-batch.

The training loop divides by the number of loss terms in the whole global
batch (known on every rank from the sampler), so the gradient is the same
whatever the world size, micro-batch or accumulation: a mean over the global
batch, not a mean of per-rank means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from launcher.config.recipe import BCE, MAE, MSE, CrossEntropy, Focal, Huber

IGNORE = -100
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_weights_from_counts(counts: list[int]) -> list[float]:
    """Inverse frequency, scaled so a balanced dataset gets weight 1 (scikit-learn's 'balanced')."""
    total, k = sum(counts), len(counts)
    return [total / (k * max(c, 1)) for c in counts]


def _flatten(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def cross_entropy(cfg: CrossEntropy, class_weights: list[float] | None) -> LossFn:
    def fn(logits, labels):
        logits, labels = _flatten(logits, labels)
        weight = torch.tensor(class_weights, dtype=torch.float32, device=logits.device) if class_weights else None
        losses = F.cross_entropy(
            logits.float(),
            labels,
            weight=weight,
            ignore_index=IGNORE,
            label_smoothing=cfg.label_smoothing,
            reduction="none",
        )
        return losses.sum()

    return fn


def focal(cfg: Focal, multi_label: bool) -> LossFn:
    """Lin et al. 2017. Multi-label: per-label sigmoid focal, averaged over labels per example."""

    def fn(logits, labels):
        if multi_label:
            logits = logits.float()
            p = torch.sigmoid(logits)
            ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            p_t = p * labels + (1 - p) * (1 - labels)
            loss = ce * (1 - p_t) ** cfg.gamma
            if cfg.alpha is not None:
                loss = loss * (cfg.alpha * labels + (1 - cfg.alpha) * (1 - labels))
            return loss.mean(dim=-1).sum()
        logits, labels = _flatten(logits, labels)
        keep = labels != IGNORE
        logits, labels = logits[keep].float(), labels[keep]
        log_p = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** cfg.gamma) * log_p
        if cfg.alpha is not None:  # binary: alpha weighs class 1
            loss = loss * torch.where(labels == 1, cfg.alpha, 1 - cfg.alpha)
        return loss.sum()

    return fn


def bce(cfg: BCE) -> LossFn:
    def fn(logits, labels):
        pos = cfg.pos_weight
        pos_weight = None
        if pos is not None:
            pos_weight = torch.as_tensor(pos, dtype=torch.float32, device=logits.device)
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=pos_weight, reduction="none")
        return losses.mean(dim=-1).sum()

    return fn


def regression(kind: str, delta: float = 1.0) -> LossFn:
    def fn(logits, labels):
        preds = logits.float().reshape(-1)
        if kind == "mse":
            return F.mse_loss(preds, labels, reduction="sum")
        if kind == "mae":
            return F.l1_loss(preds, labels, reduction="sum")
        return F.huber_loss(preds, labels, delta=delta, reduction="sum")

    return fn


def causal(inner: LossFn) -> LossFn:
    """Next-token prediction: position t predicts token t+1.

    The labels are shifted (the last position gets IGNORE), not the logits: slicing [B, T, V] logits makes
    the loss copy them, and their gradient, every step (bench/RESULTS.md §1: +30 % loss time on CPU).
    """

    def fn(logits, labels):
        return inner(logits, F.pad(labels[:, 1:], (0, 1), value=IGNORE))

    return fn


def build_loss(task: str, cfg, class_weights: list[float] | None = None) -> LossFn:
    if isinstance(cfg, CrossEntropy):
        fn = cross_entropy(cfg, class_weights)
    elif isinstance(cfg, Focal):
        fn = focal(cfg, multi_label=task == "multi_label_classification")
    elif isinstance(cfg, BCE):
        fn = bce(cfg)
    elif isinstance(cfg, (MSE, MAE)):
        fn = regression(cfg.name)
    elif isinstance(cfg, Huber):
        fn = regression("huber", cfg.delta)
    else:
        raise AssertionError(f"no loss for {cfg!r}")
    return causal(fn) if task == "causal_lm" else fn
