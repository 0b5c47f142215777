"""The plan: the numbers every rank agrees on before training starts.

The recipe's batch_size is the global batch per optimizer step, so the plan
derives micro-batch and accumulation from the world size; the same recipe
then optimises identically on 1 process or 64, and a checkpoint can resume
at a different world size.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict

from launcher.config.recipe import Recipe
from launcher.errors import Problem, RecipeError
from launcher.planning import compat, dsconfig, speed
from launcher.planning.data_cache import DataPlan
from launcher.planning.packing import packing_stats


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_nodes: int
    procs_per_node: int
    world_size: int
    device: Literal["cpu", "cuda"]
    backend: Literal["gloo", "nccl"]
    strategy: str
    offload: Literal["none", "cpu", "nvme"] = "none"
    offload_parameters: bool = False
    # the DeepSpeed config every rank uses (ZeRO strategies): generated, or the user's checked against the plan
    deepspeed_config: dict | None = None
    # rewrites of the recipe's settings to working equivalents (launcher.planning.compat), shown before launch
    warnings: list[str] = []
    strategy_reason: str | None = None  # why `strategy: auto` chose it
    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    num_train_samples: int
    num_validation_samples: int
    num_test_samples: int
    steps_per_epoch: int
    samples_dropped_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int
    # data.packing: pack: the training rows go into this many bins of max_length tokens (what train.batch_size
    # counts), filled to `packing_efficiency` (tokens over bin positions); None without packing
    num_train_bins: int | None = None
    num_train_tokens: int | None = None
    packing_efficiency: float | None = None
    lm_loss: Literal["full", "chunked", "liger"] = "full"  # train.lm_loss with `auto` resolved
    peak_tflops: float | None = None  # the cluster profile's override of the MFU denominator

    @property
    def num_train_units(self) -> int:
        """What one epoch shuffles and the global batch counts: bins when packing, else rows."""
        return self.num_train_bins if self.num_train_bins is not None else self.num_train_samples

    # the sources, their rows and shares, and the tokenized cache's entries (None: a plan made without data)
    data: DataPlan | None = None

    @property
    def choice(self):
        from launcher.planning.memory import Choice

        return Choice(self.strategy, self.offload, self.offload_parameters)

    @property
    def strategy_label(self) -> str:
        return self.choice.label

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("nodes × processes per node", f"{self.num_nodes} × {self.procs_per_node}"),
            ("world size", str(self.world_size)),
            ("device / backend", f"{self.device} / {self.backend}"),
            ("strategy", self.strategy_label + (f" (auto: {self.strategy_reason})" if self.strategy_reason else "")),
            ("global batch", str(self.global_batch_size)),
            ("micro-batch per device", str(self.micro_batch_size)),
            ("gradient accumulation", str(self.grad_accum)),
            (
                "train / validation / test rows",
                f"{self.num_train_samples} / {self.num_validation_samples} / {self.num_test_samples}",
            ),
            *self.packing_rows(),
            ("steps per epoch", str(self.steps_per_epoch)),
            (
                f"{'bins' if self.num_train_bins is not None else 'rows'} dropped per epoch (partial batch)",
                str(self.samples_dropped_per_epoch),
            ),
            ("epochs", str(self.epochs)),
            ("total optimizer steps", str(self.total_steps)),
            ("warm-up steps", str(self.warmup_steps)),
            ("causal-LM loss", self.lm_loss),
            *(self.data.rows() if self.data is not None else []),
        ]

    def packing_rows(self) -> list[tuple[str, str]]:
        if self.num_train_bins is None:
            return []
        return [
            (
                "packing (best-fit decreasing)",
                f"{self.num_train_samples} rows → {self.num_train_bins} bins, {self.num_train_tokens} tokens, "
                f"efficiency {100 * self.packing_efficiency:.1f}%",
            )
        ]


def _near_multiples(value: int, unit: int) -> str:
    low = max(unit, (value // unit) * unit)
    return ", ".join(str(v) for v in sorted({low, low + unit}))


def micro_batch_size(recipe: Recipe, world: int) -> int:
    """The recipe's micro-batch, or the global batch split over the world (no accumulation)."""
    return recipe.train.micro_batch_size or max(1, recipe.train.batch_size // world)


def _auto(recipe: Recipe, num_nodes: int, procs_per_node: int, micro: int, device: str, gpu_memory: int | None):
    if device == "cpu":
        return ("ddp", "none", False), "CPU processes: there is no GPU memory to fit, so plain ddp"
    if gpu_memory is None:
        raise RecipeError(
            "plan",
            [
                Problem(
                    "distributed.strategy",
                    "auto needs the memory per GPU: set gpu_memory "
                    "in the cluster profile (e.g. 80GiB), or choose a strategy",
                )
            ],
        )
    from launcher.planning import memory

    return memory.choose(
        recipe,
        memory.model_shape(recipe),
        num_nodes=num_nodes,
        gpus_per_node=procs_per_node,
        micro_batch=micro,
        gpu_memory=gpu_memory,
    )


def make_plan(
    recipe: Recipe,
    *,
    num_train_samples: int,
    num_validation_samples: int = 0,
    num_test_samples: int = 0,
    procs_per_node: int,
    num_nodes: int = 1,
    device: Literal["cpu", "cuda"] = "cpu",
    gpu_memory: int | None = None,
    train_lengths: list[int] | None = None,
    peak_tflops: float | None = None,
    data: DataPlan | None = None,
) -> Plan:
    """The plan of `recipe` on this layout. With data.streaming the number of training rows is unknown:
    train.max_steps sets the run's length, and `num_train_samples` is what it will draw. `train_lengths`: the
    training rows' token lengths, needed with data.packing: pack (the plan counts bins)."""
    train = recipe.train
    world = procs_per_node * num_nodes
    problems: list[Problem] = []
    if recipe.data.streaming:
        if train.max_steps is None:
            problems.append(
                Problem(
                    "train.max_steps",
                    "data.streaming reads the training data as it trains, so its number of rows (and of epochs) "
                    "is not known before the run: set train.max_steps",
                )
            )
        num_train_samples = (train.max_steps or 1) * train.batch_size
    if device == "cpu" and train.precision == "fp16":
        problems.append(Problem("train.precision", "fp16 needs a GPU; use bf16 or fp32 on CPU"))
    micro = micro_batch_size(recipe, world)
    if train.micro_batch_size is None and train.batch_size % world:
        problems.append(
            Problem(
                "train.batch_size",
                f"{train.batch_size} is not divisible by the world size {world}; "
                f"use {_near_multiples(train.batch_size, world)}, or set train.micro_batch_size",
            )
        )
    per_pass = micro * world
    if train.batch_size % per_pass:
        problems.append(
            Problem(
                "train.batch_size",
                f"{train.batch_size} is not a multiple of micro_batch_size {micro} × "
                f"world size {world} = {per_pass}; use {_near_multiples(train.batch_size, per_pass)}",
            )
        )
    accum = max(1, train.batch_size // per_pass)
    packed = None
    if recipe.data.packing == "pack":
        if train_lengths is None:
            raise ValueError("data.packing: pack needs the training rows' token lengths (planning.packing)")
        packed = packing_stats(train_lengths, recipe.data.max_length, recipe.data.seed)
    units = num_train_samples if packed is None else packed.num_bins
    steps_per_epoch = units // train.batch_size
    if steps_per_epoch == 0:
        what = "training rows" if packed is None else f"bins of {recipe.data.max_length} tokens the rows pack into"
        problems.append(
            Problem(
                "train.batch_size",
                f"{train.batch_size} is larger than the {units} {what}; one epoch would have no full batch",
            )
        )
    decision, reason = None, None
    if recipe.distributed.strategy == "auto" and not problems:
        try:
            (strategy, offload, offload_parameters), reason = _auto(
                recipe, num_nodes, procs_per_node, micro, device, gpu_memory
            )
            recipe = recipe.model_copy(
                update={
                    "distributed": recipe.distributed.model_copy(
                        update={"strategy": strategy, "offload": offload, "offload_parameters": offload_parameters}
                    )
                }
            )
        except RecipeError as exc:
            problems += exc.problems
    if recipe.distributed.strategy != "auto":
        try:
            decision = compat.decide(recipe, device)
        except RecipeError as exc:
            problems += exc.problems
    if decision is not None:
        problems += speed.problems(recipe, decision.strategy, device)
    if problems:
        raise RecipeError("plan", problems)
    if train.max_steps is not None:
        total = train.max_steps
        epochs = math.ceil(total / steps_per_epoch)
    else:
        epochs = train.epochs
        total = epochs * steps_per_epoch
    sched = train.scheduler
    warmup = sched.warmup_steps if sched.warmup_steps is not None else int(sched.warmup_ratio * total)
    plan = Plan(
        num_nodes=num_nodes,
        procs_per_node=procs_per_node,
        world_size=world,
        device=device,
        backend="nccl" if device == "cuda" else "gloo",
        strategy=decision.strategy,
        offload=decision.offload,
        offload_parameters=decision.offload_parameters,
        warnings=decision.warnings,
        strategy_reason=reason,
        global_batch_size=train.batch_size,
        micro_batch_size=micro,
        grad_accum=accum,
        num_train_samples=num_train_samples,
        num_validation_samples=num_validation_samples,
        num_test_samples=num_test_samples,
        steps_per_epoch=steps_per_epoch,
        samples_dropped_per_epoch=units - steps_per_epoch * train.batch_size,
        epochs=epochs,
        total_steps=total,
        warmup_steps=min(warmup, total),
        num_train_bins=None if packed is None else packed.num_bins,
        num_train_tokens=None if packed is None else packed.num_tokens,
        packing_efficiency=None if packed is None else round(packed.efficiency, 4),
        lm_loss=speed.lm_loss(recipe, decision.strategy),
        peak_tflops=peak_tflops,
        data=data,
    )
    ds_config, ds_problems = dsconfig.resolve(recipe, plan)
    if ds_problems:
        raise RecipeError("plan", ds_problems)
    return plan.model_copy(update={"deepspeed_config": ds_config})


def estimate_line(recipe, plan, gpu_memory: int | None) -> str:
    """One line for the dry-run table: the estimate of the plan's own strategy. A full fine-tune on CPU
    processes is counted from the model folder's files (planning.weights: no torch, so the dry run stays
    fast; a hub id from its snapshot in the local cache); other plans build the model on the meta device,
    which imports torch and transformers."""
    from launcher.config.loading import resolve_model_path
    from launcher.planning import memory
    from launcher.planning.weights import folder_shape, model_folder

    cpu_full = plan.device == "cpu" and plan.choice == ("ddp", "none", False) and recipe.model.lora is None
    try:
        if cpu_full and recipe.model.quantization is None:
            path = resolve_model_path(recipe.model.path)
            folder = model_folder(path, recipe.model.revision)
            shape = folder_shape(folder, recipe) if folder is not None else None
            if shape is None:
                where = (
                    "its folder has no safetensors weights" if folder else "it is not in the local Hugging Face cache"
                )
                return f"not estimated: {path}: {where} (launch plan RECIPE --gpus-per-node G --gpu-memory SIZE)"
        else:
            shape = memory.model_shape(recipe)
    except RecipeError as exc:
        return f"not estimated: {exc.problems[0].message}"
    est = memory.estimate(
        shape,
        recipe,
        plan.choice,
        num_nodes=plan.num_nodes,
        gpus_per_node=plan.procs_per_node,
        micro_batch=plan.micro_batch_size,
        device=plan.device,
    )
    g = memory.gib
    line = (
        f"{g(est.per_gpu)} = parameters {g(est.parameters)} + gradients {g(est.gradients)} + optimizer "
        f"{g(est.optimizer)} + activations {g(est.activations)}; host RAM per node {g(est.host_per_node)}"
    )
    if gpu_memory is not None:
        line += "; fits" if est.fits(gpu_memory) else f"; does NOT fit in {g(memory.usable(gpu_memory))} usable"
    return line
