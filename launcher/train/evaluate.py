"""Evaluation: each rank scores a strided share of a split, folding each batch into accumulated statistics
(train.metrics.EvalOutputs: class counts, running sums; ROC-AUC's scores only); the ranks' statistics are
gathered, merged and scored once. Nothing grows with the split but ROC-AUC's float32 scores."""

from __future__ import annotations

from collections.abc import Callable

import torch

from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan
from launcher.train.data import to_device
from launcher.train.metrics import EvalOutputs, compute, keeps_scores
from launcher.train.tasks import TaskHooks


class Evaluator:
    """Metrics do not depend on the world size: they are computed once, on the ranks' merged statistics."""

    def __init__(self, accelerator, model, loss_fn, collate, task: TaskHooks, recipe: Recipe, plan: Plan):
        self.acc, self.model, self.loss_fn, self.collate, self.task = accelerator, model, loss_fn, collate, task
        self.metric_names = recipe.task.resolved_metrics
        self.label_names = recipe.task.labels or []
        self.batch = plan.micro_batch_size * 2

    @torch.no_grad()
    def __call__(self, rows: list[dict], progress: Callable[[], None] = lambda: None) -> dict:
        """progress() after each batch: the hang watchdog's heartbeat (a long evaluation is not a hang)."""
        from accelerate.utils import gather_object

        self.model.eval()
        mine = rows[self.acc.process_index :: self.acc.num_processes]
        out = EvalOutputs(
            task=self.task.spec.name, label_names=self.label_names, keep_scores=keeps_scores(self.metric_names)
        )
        # Under zero3/fsdp a forward is a collective, so every rank runs as many batches as the largest share
        # (a rank with fewer rows runs a discarded filler batch).
        largest_share = -(-len(rows) // self.acc.num_processes)
        for start in range(0, largest_share, self.batch):
            chunk = mine[start : start + self.batch]
            batch = to_device(self.collate(chunk or rows[:1]), self.acc.device)
            with self.acc.autocast():
                batch_loss, kept = self.task.evaluate(self.model, batch, self.loss_fn)
            progress()
            if not chunk:
                continue
            out.loss_sum += batch_loss
            out.loss_count += float(sum(r["weight"] for r in chunk))
            out.add(kept)
        parts = gather_object([out])
        self.model.train()
        merged = parts[0]
        for part in parts[1:]:
            merged.merge(part)
        return compute(merged, self.metric_names)
