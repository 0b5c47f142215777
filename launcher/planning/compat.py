"""Which sharding, offload, LoRA and quantization settings work together, decided at plan time.

A combination that cannot work is refused before any job is queued, with what
to use instead; one that has an exact working equivalent is rewritten with a
warning. Nothing here is discovered on every rank after allocation.

`incompatibilities` is the single rule set: the plan applies it to the
recipe's choice, and the planner filters its candidate (strategy, offload)
pairs with it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from launcher.config.recipe import Recipe
from launcher.errors import Problem, RecipeError

ZERO = ("zero1", "zero2", "zero3")
SHARDS_PARAMETERS = ("zero3", "fsdp")
# Training code for these exists in this version; `auto` is the planner's to resolve.
IMPLEMENTED = ("ddp", "zero1", "zero2", "zero3", "fsdp")
# Why an 8-bit (LLM.int8) base cannot be sharded, as measured with bitsandbytes 0.50 on 2 ranks
# (tests/integration/test_quantized_sharding.py shows both). A 4-bit base can: its layer keeps its
# quantization state on the module, and bitsandbytes gives it back to the gathered weight at each forward.
EIGHT_BIT = {
    "fsdp": "fully_shard replaces each weight by a sharded tensor, and the int8 weight's matrix and row scales "
    "(Int8Params.CB and .SCB) are lost with it, so the forward fails; use model.quantization.bits: 4 with fsdp, "
    "or strategy ddp with 8-bit",
    "zero3": "bitsandbytes keeps the whole int8 matrix in each weight's CB attribute, which ZeRO-3 does not "
    "partition, so every rank would still hold the whole base; use model.quantization.bits: 4 with zero3, or "
    "strategy ddp with 8-bit",
}


class Decision(NamedTuple):
    """The settings the ranks will run with, and a warning per rewrite."""

    strategy: str
    offload: str
    offload_parameters: bool
    warnings: list[str]


def incompatibilities(
    recipe: Recipe,
    strategy: str,
    offload: str,
    *,
    offload_parameters: bool | None = None,
    device: Literal["cpu", "cuda"] = "cuda",
) -> list[Problem]:
    """Why `strategy` with `offload` cannot run this recipe as asked (empty: it can)."""
    dist, model = recipe.distributed, recipe.model
    params = dist.offload_parameters if offload_parameters is None else offload_parameters
    quant = model.quantization
    problems = []
    if strategy not in IMPLEMENTED:
        problems.append(
            Problem(
                "distributed.strategy",
                f"{strategy!r} is not supported by this version; use one of {', '.join(IMPLEMENTED)}",
            )
        )
    if quant is not None and model.lora is None:
        problems.append(
            Problem(
                "model.quantization",
                f"a {quant.bits}-bit base is frozen and cannot be trained in "
                "full; add a model.lora section (QLoRA), or remove quantization",
            )
        )
    if quant is not None and quant.bits == 8 and strategy in SHARDS_PARAMETERS:
        problems.append(
            Problem("distributed.strategy", f"{strategy} cannot shard an 8-bit base: {EIGHT_BIT[strategy]}")
        )
    if quant is not None and strategy in ("zero1", "zero2"):
        problems.append(
            Problem(
                "distributed.strategy",
                f"{strategy} with a {quant.bits}-bit base only shards the "
                "adapters' optimizer states; use ddp (equivalent here, and what it is rewritten to)",
            )
        )
    if offload != "none" and strategy == "ddp":
        problems.append(
            Problem(
                "distributed.offload",
                f"offload: {offload} needs a sharded strategy; use zero2 or "
                "zero3 with offload, or fsdp with offload: cpu",
            )
        )
    if offload == "nvme" and strategy == "fsdp":
        problems.append(
            Problem("distributed.offload", "fsdp offloads to cpu only; use offload: cpu, or zero3 for nvme")
        )
    if offload == "nvme" and not dist.nvme_path:
        problems.append(
            Problem("distributed.nvme_path", "offload: nvme needs nvme_path, a fast local folder on every node")
        )
    if offload == "nvme" and device == "cpu":
        problems.append(
            Problem("distributed.offload", "nvme offload needs GPUs (DeepSpeed's async I/O); use offload: cpu")
        )
    if params and offload == "none":
        problems.append(
            Problem(
                "distributed.offload_parameters",
                "offloading parameters needs somewhere to put them; set distributed.offload: cpu (or nvme)",
            )
        )
    if params and strategy in ("zero1", "zero2"):
        problems.append(
            Problem(
                "distributed.offload_parameters",
                f"{strategy} keeps full parameters on every GPU; use zero3 (or fsdp) to offload parameters",
            )
        )
    if strategy == "fsdp" and offload == "cpu" and not params:
        problems.append(
            Problem(
                "distributed.offload_parameters",
                "fsdp's CPU offload moves parameters, gradients "
                "and optimizer states together; set offload_parameters: true",
            )
        )
    if strategy == "fsdp" and recipe.train.precision == "fp16":
        problems.append(
            Problem(
                "train.precision",
                "fsdp trains with bf16 or fp32 here (fp16 needs a gradient "
                "scaler); use bf16, or a ZeRO strategy for fp16",
            )
        )
    if dist.deepspeed_config is not None and strategy not in ZERO:
        problems.append(
            Problem(
                "distributed.deepspeed_config",
                f"a DeepSpeed config applies to zero1/zero2/zero3, not {strategy}; remove it or pick a ZeRO strategy",
            )
        )
    return problems


def _rewrite(recipe: Recipe, device: str) -> Decision:
    """Exact working equivalents of what the recipe asks, each with a warning."""
    dist = recipe.distributed
    strategy, offload, params, warnings = dist.strategy, dist.offload, dist.offload_parameters, []
    if recipe.model.quantization is not None and strategy in ("zero1", "zero2") and dist.deepspeed_config is None:
        warnings.append(
            f"distributed.strategy {strategy} → ddp: the {recipe.model.quantization.bits}-bit base is "
            "frozen, so ZeRO would shard only the small adapter optimizer states"
            + (f"; offload: {offload} dropped" if offload != "none" else "")
        )
        strategy, offload, params = "ddp", "none", False
    if strategy == "fsdp" and offload == "cpu" and device == "cpu":
        warnings.append(
            "distributed.offload cpu → none: on a CPU-only run fsdp's parameters already live in host memory"
        )
        offload, params = "none", False
    if strategy == "fsdp" and offload == "cpu" and not params:
        warnings.append(
            "distributed.offload_parameters → true: fsdp's CPU offload moves parameters, gradients and "
            "optimizer states together"
        )
        params = True
    return Decision(strategy, offload, params, warnings)


def decide(recipe: Recipe, device: Literal["cpu", "cuda"]) -> Decision:
    """The recipe's sharding settings made runnable, or a RecipeError saying what to use instead."""
    decision = _rewrite(recipe, device)
    problems = incompatibilities(
        recipe, decision.strategy, decision.offload, offload_parameters=decision.offload_parameters, device=device
    )
    if problems:
        raise RecipeError("plan", problems)
    return decision
