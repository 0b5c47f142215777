"""Loss registry: loss config class (config.losses' LossConfig union) → builder. Each loss returns the SUM
of its terms over a micro-batch.

The training loop divides by the number of loss terms in the whole global
batch (known on every rank from the sampler), so the gradient is the same
whatever the world size, micro-batch or accumulation: a mean over the global
batch, not a mean of per-rank means.

What a loss needs from the data (class weights `auto`: the training split's class counts) comes in through a
`LossContext`, so the run builds every loss the same way and knows none by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from launcher.config.losses import BCE, DPO, MAE, MSE, ORPO, BradleyTerry, CrossEntropy, Focal, Huber, SimPO
from launcher.config.tasks import TaskSpec
from launcher.train.tasks import IGNORE, PairLogps

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossContext:
    """What a loss may need beyond its config: the task, and facts of the training data, computed on demand."""

    task: TaskSpec
    label_counts: Callable[[], list[int]] = field(default=lambda: [])  # rows per class in the training split
    log: Callable[[str], None] = field(default=lambda message: None)


def class_weights_from_counts(counts: list[int]) -> list[float]:
    """Inverse frequency, scaled so a balanced dataset gets weight 1 (scikit-learn's 'balanced')."""
    total, k = sum(counts), len(counts)
    return [total / (k * max(c, 1)) for c in counts]


def _flatten(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def cross_entropy(cfg: CrossEntropy, ctx: LossContext) -> LossFn:
    class_weights = None
    if cfg.class_weights == "auto":
        class_weights = class_weights_from_counts(ctx.label_counts())
        ctx.log(f"class weights: {[round(w, 4) for w in class_weights]}")
    elif cfg.class_weights is not None:
        class_weights = list(cfg.class_weights)

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


def focal(cfg: Focal, ctx: LossContext) -> LossFn:
    """Lin et al. 2017. Multi-label: per-label sigmoid focal, averaged over labels per example."""
    multi_label = ctx.task.label == "multi_hot"

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


def bce(cfg: BCE, ctx: LossContext) -> LossFn:
    def fn(logits, labels):
        pos = cfg.pos_weight
        pos_weight = None
        if pos is not None:
            pos_weight = torch.as_tensor(pos, dtype=torch.float32, device=logits.device)
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=pos_weight, reduction="none")
        return losses.mean(dim=-1).sum()

    return fn


def _pointwise(distance: Callable[..., torch.Tensor]) -> Callable[..., LossFn]:
    """A regression loss: `distance(predictions, targets, reduction="sum", **settings)` on one output each."""

    def build(cfg, ctx: LossContext) -> LossFn:
        settings = {"delta": cfg.delta} if isinstance(cfg, Huber) else {}

        def fn(logits, labels):
            return distance(logits.float().reshape(-1), labels, reduction="sum", **settings)

        return fn

    return build


def causal(inner: LossFn) -> LossFn:
    """Next-token prediction: position t predicts token t+1.

    The labels are shifted (the last position gets IGNORE), not the logits: slicing [B, T, V] logits makes
    the loss copy them, and their gradient, every step (bench/RESULTS.md §1: +30 % loss time on CPU).
    """

    def fn(logits, labels):
        return inner(logits, F.pad(labels[:, 1:], (0, 1), value=IGNORE))

    fn.per_position = inner  # the loss of logits [N, V] against their own targets [N] (train.lm_loss: chunked)
    return fn


# ----------------------------------------------------------------------------- preference pairs
Rewards = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PairLoss:
    """A loss on the log-probabilities of preference pairs (train.tasks.Preference computes them): the sum of
    one term per pair, and the implicit rewards of both answers the metrics score (TRL's definitions)."""

    terms: Callable[[PairLogps, PairLogps | None], torch.Tensor]
    rewards: Callable[[PairLogps, PairLogps | None], Rewards]

    def __call__(self, policy: PairLogps, reference: PairLogps | None = None) -> torch.Tensor:
        return self.terms(policy, reference).sum()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _means(p: PairLogps) -> Rewards:
    """Length-normalised log-probabilities (per answer token)."""
    return p.chosen / p.chosen_tokens.clamp(min=1), p.rejected / p.rejected_tokens.clamp(min=1)


def dpo(cfg: DPO, ctx: LossContext) -> PairLoss:
    """Rafailov et al. 2023 on the summed log-ratios to the reference; cDPO label smoothing; IPO (Azar et al.
    2023) on per-token log-ratios, as TRL normalises it; the SLiC hinge."""
    beta, smoothing = cfg.beta, cfg.label_smoothing

    def ratios(p: PairLogps, ref: PairLogps) -> Rewards:
        return p.chosen - ref.chosen, p.rejected - ref.rejected

    def terms(p, ref):
        chosen, rejected = ratios(p, ref)
        if cfg.variant == "ipo":
            delta = chosen / p.chosen_tokens.clamp(min=1) - rejected / p.rejected_tokens.clamp(min=1)
            return (delta - 1 / (2 * beta)) ** 2
        delta = beta * (chosen - rejected)
        if cfg.variant == "hinge":
            return torch.relu(1 - delta)
        return -(1 - smoothing) * F.logsigmoid(delta) - smoothing * F.logsigmoid(-delta)

    def rewards(p, ref):
        chosen, rejected = ratios(p, ref)
        return beta * chosen.detach(), beta * rejected.detach()

    return PairLoss(terms, rewards)


def orpo(cfg: ORPO, ctx: LossContext) -> PairLoss:
    """Hong et al. 2024: the chosen answer's mean NLL plus beta times the odds-ratio term on mean log-probs."""

    def terms(p, ref):
        chosen, rejected = _means(p)
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        return -chosen - cfg.beta * F.logsigmoid(log_odds)

    def rewards(p, ref):
        chosen, rejected = _means(p)
        return cfg.beta * chosen.detach(), cfg.beta * rejected.detach()

    return PairLoss(terms, rewards)


def simpo(cfg: SimPO, ctx: LossContext) -> PairLoss:
    """Meng et al. 2024: -log sigmoid(beta * (mean log-prob chosen - rejected) - gamma); no reference."""

    def terms(p, ref):
        chosen, rejected = _means(p)
        return -F.logsigmoid(cfg.beta * (chosen - rejected) - cfg.gamma)

    def rewards(p, ref):
        chosen, rejected = _means(p)
        return cfg.beta * chosen.detach(), cfg.beta * rejected.detach()

    return PairLoss(terms, rewards)


def bradley_terry(cfg: BradleyTerry, ctx: LossContext) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The reward model's pairwise loss on the rewards of the chosen and the rejected answers."""

    def fn(chosen, rejected):
        return -F.logsigmoid(chosen - rejected).sum()

    return fn


# loss config class → builder(cfg, ctx); total over the schema's LossConfig union (tests/unit/test_registries.py)
LOSSES: dict[type, Callable[..., LossFn]] = {
    CrossEntropy: cross_entropy,
    Focal: focal,
    BCE: bce,
    MSE: _pointwise(F.mse_loss),
    MAE: _pointwise(F.l1_loss),
    Huber: _pointwise(F.huber_loss),
    DPO: dpo,
    ORPO: orpo,
    SimPO: simpo,
    BradleyTerry: bradley_terry,
}


def build_loss(cfg, ctx: LossContext) -> LossFn:
    """The loss `cfg` configures, for the task of `ctx` (next-token tasks score the following token)."""
    fn = LOSSES[type(cfg)](cfg, ctx)
    return causal(fn) if ctx.task.next_token else fn
