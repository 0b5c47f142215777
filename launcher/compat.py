"""Which strategy, offload and model settings can work together, decided at plan time.

A combination that cannot work is refused here, with what to use instead, so it
is never discovered on every rank after allocation. The planner also asks these
rules before it lets `strategy: auto` consider a candidate.
"""
from __future__ import annotations

from launcher.loading import Problem
from launcher.recipe import Recipe

ZERO = ("zero1", "zero2", "zero3")
SHARDS_PARAMETERS = ("zero3", "fsdp")


def incompatibilities(recipe: Recipe, strategy: str | None = None, offload: str | None = None,
                      offload_parameters: bool | None = None) -> list[Problem]:
    """Problems of running `recipe` with this strategy and offload (the recipe's own when not given)."""
    dist = recipe.distributed
    strategy = dist.strategy if strategy is None else strategy
    offload = dist.offload if offload is None else offload
    offload_parameters = dist.offload_parameters if offload_parameters is None else offload_parameters
    quant = recipe.model.quantization
    problems = []
    if quant is not None and strategy in SHARDS_PARAMETERS:
        problems.append(Problem("model.quantization", f"a {quant.bits}-bit bitsandbytes base cannot be sharded by "
                                f"{strategy}; use ddp or zero2 (the frozen quantized base is small enough to replicate)"))
    if offload != "none" and strategy not in ZERO + ("fsdp",):
        problems.append(Problem("distributed.offload", f"offload needs a sharded strategy, not {strategy}; "
                                "use zero2 (optimizer offload) or zero3 (optimizer and parameter offload)"))
    if offload == "nvme" and strategy != "zero3":
        problems.append(Problem("distributed.offload", f"nvme offload works with zero3 only (DeepSpeed ZeRO-Infinity), "
                                f"not {strategy}; use offload: cpu, or strategy: zero3"))
    if offload == "nvme" and not dist.nvme_path:
        problems.append(Problem("distributed.nvme_path", "offload: nvme needs nvme_path, a fast local folder on every node"))
    if offload_parameters and strategy not in SHARDS_PARAMETERS:
        problems.append(Problem("distributed.offload_parameters", f"{strategy} keeps whole parameters on every GPU; "
                                "parameter offload needs zero3 or fsdp"))
    if offload_parameters and offload == "none":
        problems.append(Problem("distributed.offload_parameters", "needs offload: cpu (or nvme with zero3)"))
    if strategy == "fsdp" and offload == "cpu" and not offload_parameters:
        problems.append(Problem("distributed.offload_parameters", "fsdp offloads parameters, gradients and optimizer "
                                "together; set offload_parameters: true, or use zero2/zero3 for optimizer-only offload"))
    return problems
