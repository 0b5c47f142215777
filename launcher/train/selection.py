"""The best checkpoint and early stopping (train.keep_best, train.early_stopping), asked by the loop after each
validation evaluation: "keep this step?" and "stop?".

Every rank holds the same merged validation metrics (train.evaluate), so every rank reaches the same verdict
at the same step boundary without a collective. The state (best so far, evaluations without improvement)
travels in each checkpoint, so a resumed run counts on where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launcher.config.training import TrainConfig
from launcher.records import Best


@dataclass
class Watch:
    """One validation number and which way is better."""

    metric: str
    mode: str  # "min" or "max"
    min_delta: float = 0.0
    best: float | None = None

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta


class Selection:
    def __init__(self, train: TrainConfig, state: dict | None = None):
        keep, early = train.keep_best, train.early_stopping
        self.keep = Watch(keep.metric, keep.mode) if keep is not None else None
        self.early = Watch(early.metric, early.mode, early.min_delta) if early is not None else None
        self.patience = early.patience if early is not None else 0
        self.best: Best | None = None
        self.evals_without_improvement = 0
        if state:
            self.best = Best.model_validate(state["best"]) if state.get("best") else None
            self.evals_without_improvement = state["evals_without_improvement"]
            if self.keep is not None and self.best is not None:
                self.keep.best = self.best.value
            if self.early is not None:
                self.early.best = state.get("early_best")

    def observe(self, step: int, metrics: dict) -> bool:
        """A validation evaluation at `step`; True when it is a new best checkpoint to keep (save it now)."""
        if self.early is not None:
            value = float(metrics[self.early.metric])
            if self.early.improves(value):
                self.early.best, self.evals_without_improvement = value, 0
            else:
                self.evals_without_improvement += 1
        if self.keep is None or not self.keep.improves(float(metrics[self.keep.metric])):
            return False
        self.keep.best = float(metrics[self.keep.metric])
        self.best = Best(step=step, metric=self.keep.metric, mode=self.keep.mode, value=self.keep.best, metrics=metrics)
        return True

    def should_stop(self) -> bool:
        return self.early is not None and self.evals_without_improvement >= self.patience

    def why_stopped(self) -> str:
        early = self.early
        return (
            f"validation {early.metric} has not improved by more than {early.min_delta:g} for {self.patience} "
            f"evaluation(s) (best {early.best:.4g})"
        )

    def state(self) -> dict | None:
        if self.keep is None and self.early is None:
            return None
        return {
            "best": self.best.model_dump() if self.best is not None else None,
            "evals_without_improvement": self.evals_without_improvement,
            "early_best": self.early.best if self.early is not None else None,
        }
