"""The stateless sampler: disjoint rank shards, full epoch coverage, the same global batch at any world size."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.config.recipe import Recipe
from launcher.planning.plan import make_plan
from launcher.train.data import Sampler, balanced_row_probs


def plan_for(world: int, micro: int, rows: int = 103, batch: int = 8):
    recipe = Recipe.model_validate(
        {
            "model": {"path": "org/m"},
            "task": {"type": "regression"},
            "data": {"train": "t.jsonl"},
            "output_dir": "o",
            "train": {"batch_size": batch, "micro_batch_size": micro, "epochs": 2},
        }
    )
    return make_plan(recipe, num_train_samples=rows, procs_per_node=world)


@pytest.mark.parametrize("world,micro", [(1, 8), (2, 4), (2, 2), (4, 1)])
def test_ranks_are_disjoint_and_cover_each_epoch(world, micro):
    plan = plan_for(world, micro)
    weights = np.ones(plan.num_train_samples)
    sampler = Sampler(plan, 7, weights)
    for epoch in range(plan.epochs):
        seen = []
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            per_rank = [sum(sampler.batch(step, r).micro_batches, []) for r in range(world)]
            flat = sum(per_rank, [])
            assert len(flat) == len(set(flat)) == plan.global_batch_size
            seen += flat
        assert len(set(seen)) == plan.steps_per_epoch * plan.global_batch_size  # all but the dropped remainder


def test_global_batch_is_independent_of_world_size_and_epochs_reshuffle():
    weights = np.arange(103, dtype=float)
    one, four = plan_for(1, 8), plan_for(4, 1)
    for step in (0, 5, 12, 13, 20):
        a = Sampler(one, 7, weights).batch(step, 0)
        b = [Sampler(four, 7, weights).batch(step, r) for r in range(4)]
        assert sorted(sum(a.micro_batches, [])) == sorted(sum((sum(x.micro_batches, []) for x in b), []))
        assert all(x.global_weight == a.global_weight for x in b)
    sampler = Sampler(one, 7, weights)
    first = sum(sampler.batch(0, 0).micro_batches, [])
    second_epoch = sum(sampler.batch(one.steps_per_epoch, 0).micro_batches, [])
    assert first != second_epoch


def test_balance_draws_classes_equally_and_deterministically():
    labels = [0] * 90 + [1] * 10
    plan = plan_for(1, 10, rows=100, batch=10)
    probs = balanced_row_probs(labels)
    drawn = [
        labels[i]
        for step in range(plan.steps_per_epoch)
        for i in Sampler(plan, 3, np.ones(100), probs).batch(step, 0).micro_batches[0]
    ]
    assert 0.35 < sum(drawn) / len(drawn) < 0.65  # about half minority, against 10% without balancing
    again = [
        labels[i]
        for step in range(plan.steps_per_epoch)
        for i in Sampler(plan, 3, np.ones(100), probs).batch(step, 0).micro_batches[0]
    ]
    assert drawn == again
