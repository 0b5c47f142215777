"""Evaluation: each rank scores a strided share of a split; outputs are gathered and scored once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan
from launcher.train.data import to_device
from launcher.train.metrics import EvalOutputs, compute
from launcher.train.tasks import TaskHooks


class Evaluator:
    """Metrics do not depend on the world size: they are computed on the whole gathered split."""

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
        loss_sum, count, probs, labels = 0.0, 0.0, [], []
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
            loss_sum += batch_loss
            count += float(sum(r["weight"] for r in chunk))
            if kept is not None:
                probs.append(kept[0])
                labels.append(kept[1])
        parts = gather_object([(loss_sum, count, probs, labels)])
        self.model.train()
        out = EvalOutputs(
            task=self.task.spec.name,
            label_names=self.label_names,
            loss_sum=sum(p[0] for p in parts),
            loss_count=sum(p[1] for p in parts),
        )
        all_probs = [a for p in parts for a in p[2]]
        all_labels = [a for p in parts for a in p[3]]
        if all_probs:
            if self.task.spec.label == "number":  # predictions, not class probabilities
                out.preds, out.labels = np.concatenate(all_probs), np.concatenate(all_labels)
            else:
                out.probs, out.labels = np.concatenate(all_probs), np.concatenate(all_labels)
        return compute(out, self.metric_names)
