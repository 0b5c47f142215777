"""The DeepSpeed config, generated from the recipe and the plan (never "auto" values).

Batch sizes, accumulation, precision and clipping come from the plan, so
DeepSpeed optimises exactly what the plan printed. A user's own JSON
(`distributed.deepspeed_config`) is accepted for the knobs the recipe does
not model (bucket sizes, prefetch, ...) and is checked key by key against the
plan: a value that disagrees, or an "auto", is refused naming the key.

No torch import here: `--dry-run` and the planner use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.errors import Problem

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
FIELD = "distributed.deepspeed_config"
# Blocks the launcher owns: the recipe's optimizer and scheduler are used (a client torch AdamW, so no
# DeepSpeed op is compiled), and DeepSpeed's own would silently replace them.
OWNED_BLOCKS = {"optimizer": "train.optimizer", "scheduler": "train.scheduler"}


def _offload(device: str, nvme_path: str | None, pin: bool) -> dict:
    block: dict[str, Any] = {"device": device, "pin_memory": pin}
    if device == "nvme":
        block["nvme_path"] = nvme_path
    return block


def generate(recipe, plan) -> dict:
    """The config for `plan.strategy` (zero1/2/3): every value the plan decides, and sane defaults."""
    dist, precision = recipe.distributed, recipe.train.precision
    zero: dict[str, Any] = {
        "stage": STAGES[plan.strategy],
        "overlap_comm": plan.device == "cuda",
        "contiguous_gradients": True,
    }
    pin = plan.device == "cuda"
    if plan.offload != "none":
        zero["offload_optimizer"] = _offload(plan.offload, dist.nvme_path, pin)
        if plan.offload_parameters:
            zero["offload_param"] = _offload(plan.offload, dist.nvme_path, pin)
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # consolidated export
    return {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": recipe.train.grad_clip or 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        # the recipe's AdamW is handed to DeepSpeed as a client optimizer
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _set(config: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


# Keys whose value the plan decides; a user JSON may repeat them only with the same value.
PLANNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.stage",
    "zero_optimization.offload_optimizer.device",
    "zero_optimization.offload_param.device",
)
WHY = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size (or batch_size / world size)",
    "gradient_accumulation_steps": "batch_size / (micro_batch_size × world size)",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "distributed.strategy",
    "zero_optimization.offload_optimizer.device": "distributed.offload",
    "zero_optimization.offload_param.device": "distributed.offload with offload_parameters",
}


def merge_user(user: dict, generated: dict) -> tuple[dict, list[Problem]]:
    """The user's config completed with the plan's values; a problem per key that disagrees with the plan."""
    problems = []
    for block, field in OWNED_BLOCKS.items():
        if block in user:
            problems.append(Problem(f"{FIELD}: {block}", f"remove the {block!r} block; the recipe's {field} is used"))
    mine, theirs = _flatten(generated), _flatten(user)
    for key, value in theirs.items():
        if value == "auto":
            problems.append(
                Problem(
                    f"{FIELD}: {key}",
                    f'"auto" is not accepted; the plan sets {key} = '
                    f"{json.dumps(mine.get(key))} (remove the key to use it)",
                )
            )
    for key in PLANNED_KEYS:
        if key in theirs and theirs[key] != "auto" and theirs[key] != mine.get(key):
            problems.append(
                Problem(
                    f"{FIELD}: {key}",
                    f"{json.dumps(theirs[key])} disagrees with the plan's "
                    f"{json.dumps(mine.get(key))} (from {WHY[key]}); remove the key or change the "
                    "recipe",
                )
            )
    merged = json.loads(json.dumps(user))
    for key, value in mine.items():
        if key not in theirs:
            _set(merged, key, value)
    return merged, problems


def resolve(recipe, plan) -> tuple[dict | None, list[Problem]]:
    """The config the ranks will use (None when the strategy is not ZeRO), or the problems with the user's."""
    if plan.strategy not in STAGES:
        return None, []
    generated = generate(recipe, plan)
    path = recipe.distributed.deepspeed_config
    if path is None:
        return generated, []
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return None, [Problem(FIELD, f"cannot read {path} as JSON: {exc}")]
    if not isinstance(user, dict):
        return None, [Problem(FIELD, f"{path} must hold a JSON object")]
    return merge_user(user, generated)
