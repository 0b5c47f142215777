"""Batch arithmetic: the global batch is fixed; micro-batch × accumulation × world size must equal it."""

from __future__ import annotations

import pytest

from launcher.config.recipe import Recipe
from launcher.errors import RecipeError
from launcher.planning.plan import make_plan


def recipe(**train) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": "org/model"},
            "task": {"type": "sequence_classification", "num_labels": 2},
            "data": {"train": "train.jsonl"},
            "train": train,
            "output_dir": "out",
        }
    )


@pytest.mark.parametrize(
    "world,micro,expected", [(1, None, (32, 1)), (2, None, (16, 1)), (4, 4, (4, 2)), (8, 1, (1, 4))]
)
def test_micro_batch_and_accumulation(world, micro, expected):
    plan = make_plan(recipe(batch_size=32, micro_batch_size=micro), num_train_samples=1000, procs_per_node=world)
    assert (plan.micro_batch_size, plan.grad_accum) == expected
    assert plan.micro_batch_size * plan.grad_accum * plan.world_size == 32


def test_steps_epochs_warmup_and_dropped_rows():
    plan = make_plan(
        recipe(batch_size=32, epochs=3, scheduler={"warmup_ratio": 0.1}), num_train_samples=1000, procs_per_node=2
    )
    assert plan.steps_per_epoch == 31 and plan.samples_dropped_per_epoch == 8
    assert plan.total_steps == 93 and plan.warmup_steps == 9 and plan.epochs == 3


def test_max_steps_overrides_epochs_and_warmup_steps_override_ratio():
    plan = make_plan(
        recipe(batch_size=10, max_steps=25, scheduler={"warmup_steps": 5, "warmup_ratio": 0.5}),
        num_train_samples=100,
        procs_per_node=1,
    )
    assert plan.total_steps == 25 and plan.epochs == 3 and plan.warmup_steps == 5


def test_multi_node_world():
    plan = make_plan(recipe(batch_size=64), num_train_samples=640, procs_per_node=4, num_nodes=2, device="cuda")
    assert plan.world_size == 8 and plan.micro_batch_size == 8 and plan.backend == "nccl"


def test_indivisible_batch_names_the_numbers():
    with pytest.raises(RecipeError) as info:
        make_plan(recipe(batch_size=30, micro_batch_size=4), num_train_samples=1000, procs_per_node=2)
    assert "30 is not a multiple of micro_batch_size 4 × world size 2 = 8; use 24, 32" in str(info.value)


def test_batch_larger_than_data():
    with pytest.raises(RecipeError, match="larger than the 10 training rows"):
        make_plan(recipe(batch_size=32), num_train_samples=10, procs_per_node=1)


def test_fp16_is_refused_on_cpu_but_planned_on_gpu():
    with pytest.raises(RecipeError, match="fp16 needs a GPU; use bf16 or fp32 on CPU"):
        make_plan(recipe(batch_size=8, precision="fp16"), num_train_samples=100, procs_per_node=1)
    assert make_plan(recipe(batch_size=8, precision="fp16"), num_train_samples=100, procs_per_node=1, device="cuda")
