"""Whether a checkpoint can continue a recipe exactly, decided before any rank starts (and again on the ranks).

A checkpoint records a fingerprint of what it must share with the recipe (model, task, classes in order,
global batch, LoRA, the data, max_length, the data seed: `fingerprint`) and the train settings it was
written under (`train_settings`). A fingerprint that differs refuses the resume naming each field with both
values; train settings that differ (learning rate, max_steps, the eval/save/log cadence...) take effect and
are listed in the plan's start row (`settings_changes`). Torch-free: the launcher runs it on --dry-run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from launcher.records import CheckpointState, RecordError
from launcher.train.checkpoint import STATE_FILE, CheckpointMismatch, CheckpointUnsafe, read_state
from launcher.train.unpickling import unsafe_globals


def fingerprint(recipe, plan) -> dict:
    """What a checkpoint must share with a recipe to continue it exactly: the model and its layout (LoRA decides
    the states' layout; so does the strategy, which check_compatible compares as planned), the task and its
    classes in order, the global batch, and what step N trains on (the data, max_length, the data seed)."""
    return {
        "model": recipe.model.path,
        "task": recipe.task.type,
        "num_labels": recipe.task.resolved_num_labels,
        "labels": recipe.task.labels,
        "global_batch_size": recipe.train.batch_size,
        "lora": recipe.model.lora is not None,
        "max_length": recipe.data.max_length,
        "data_seed": recipe.data.seed,
        "packing": recipe.data.packing,  # what a step's data is: bins or rows, and their order
        "group_by_length": recipe.data.group_by_length,
        "data": data_fingerprint(recipe, plan),
    }


FINGERPRINT_FIELDS = ("model", "task", "num_labels", "labels", "global_batch_size", "lora", "max_length", "data_seed",
                      "packing", "group_by_length", "data")  # fmt: skip
# what every launcher version recorded: compared even when absent (then the checkpoint is not one of ours)
ALWAYS_RECORDED = ("model", "task", "num_labels", "global_batch_size")


# data settings that turn the sources into rows (max_length, seed, packing and group_by_length are fields of
# their own in the fingerprint, named when they differ), less those that only say where or how to prepare them
SOURCES = ("train", "validation", "test")
OWN_FIELDS = ("max_length", "seed", "packing", "group_by_length")  # data fields with a fingerprint key of their own
NOT_DATA = ("cache_dir", "num_proc", "prepare")


def data_fingerprint(recipe, plan) -> str:
    """The data a run trains on, cheaply, from the plan's data (planning.data_cache.DataPlan): each source's
    cache key (its bytes, the tokenizer, the settings that tokenize it, its carve; a streamed source: its name),
    its rows, dropped rows and weight; the settings that make rows of the sources; the rows per split."""
    digest = hashlib.sha256()
    for source in plan.data.sources if plan.data is not None else []:
        parts = [source.split, source.index, source.key or source.label, source.rows, source.dropped, source.weight]
        digest.update(json.dumps(parts).encode())
    settings = recipe.data.model_dump(mode="json", exclude={*SOURCES, *OWN_FIELDS, *NOT_DATA})
    settings["chat_template"] = recipe.task.chat_template
    counts = [plan.num_train_samples, plan.num_validation_samples, plan.num_test_samples]
    digest.update(json.dumps([settings, counts], sort_keys=True).encode())
    return f"sha256:{digest.hexdigest()[:16]} ({counts[0]} train / {counts[1]} validation / {counts[2]} test rows)"


def check_compatible(folder: Path, recipe, plan) -> CheckpointState:
    """The checkpoint's state if it can continue this recipe under this plan, on its rows. The world size may
    differ: the data position is in samples and the global batch is the recipe's, so only the split into
    micro-batches changes (ZeRO states are resharded at load: train.engines). The strategy may not: its
    states' layout. Nothing in it may run code when loaded (train.unpickling)."""
    try:
        state = read_state(folder)
    except RecordError:
        state = None
    if state is None or state.fingerprint is None or state.world_size is None:
        raise CheckpointMismatch(
            f"{folder} is not a readable checkpoint (no valid {STATE_FILE}); point train.resume "
            "at a checkpoint-* folder, or remove it"
        )
    unsafe = unsafe_globals(folder)
    if unsafe:
        raise CheckpointUnsafe(
            f"{folder} holds a pickle that would run code when loaded: {'; '.join(unsafe[:3])}"
            f"{f' (and {len(unsafe) - 3} more)' if len(unsafe) > 3 else ''}. A checkpoint holds only tensors, "
            "numbers, text and the state types README.md lists; nothing of it was loaded. Remove that folder, "
            "or start over with train.resume=never in a fresh output_dir."
        )
    mine = {k: v for k, v in fingerprint(recipe, plan).items() if k in state.fingerprint or k in ALWAYS_RECORDED}
    differ = {k: (state.fingerprint.get(k), v) for k, v in mine.items() if state.fingerprint.get(k) != v}
    if differ:
        detail = "; ".join(f"{k}: checkpoint {a!r}, recipe {b!r}" for k, (a, b) in differ.items())
        raise CheckpointMismatch(
            f"{folder} was written by a different run, or with other data or settings ({detail}); resuming "
            "would not continue it exactly. Restore those settings, use another output_dir, or start over "
            "with train.resume=never in a fresh output_dir."
        )
    written = state.plan.get("strategy", plan.strategy)
    if written != plan.strategy:  # `strategy: auto` can choose differently on another number of GPUs
        raise CheckpointMismatch(
            f"{folder} holds {written} states but this launch plans {plan.strategy} "
            f"({plan.world_size} processes); set distributed.strategy={written} to resume "
            f"it (any number of processes works), or train.resume=never in a fresh output_dir"
        )
    return state


def unrecorded(state: CheckpointState) -> list[str]:
    """The fingerprint fields a checkpoint of an earlier launcher version did not record (not compared)."""
    return [k for k in FINGERPRINT_FIELDS if k not in (state.fingerprint or {})]


def world_size_note(state: CheckpointState, world_size: int) -> str | None:
    """What changes when a checkpoint resumes on another number of processes (None: the same)."""
    if state.world_size == world_size:
        return None
    return (
        f"world size changed: checkpoint written by {state.world_size} processes, resuming on {world_size}; "
        f"same global batch, split into other micro-batches (summation order differs: float rounding only)"
    )


def settings_changes(state: CheckpointState, recipe) -> list[str]:
    """The train settings that differ from the checkpoint's (they take effect on resume), as 'key old → new'."""
    if state.settings is None:
        return []
    now = _flat(train_settings(recipe))
    then = _flat(state.settings)
    return [
        f"train.{k} {then.get(k)!r} → {now.get(k)!r}" for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)
    ]


def train_settings(recipe) -> dict:
    """What a checkpoint records of the recipe's train section: the settings that may change on resume (the
    global batch is in the fingerprint; resume says where to start)."""
    return recipe.train.model_dump(mode="json", exclude={"resume", "batch_size"})


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
