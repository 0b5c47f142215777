"""The parts a rank's run is assembled from: the accelerator and process group, optimizer, scheduler, and
the process-level settings around them (collective timeouts, library logging, peak memory)."""

from __future__ import annotations

import torch

from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan


class WorldMismatch(RuntimeError):
    """This rank does not see the world the plan made (ranks not started by torchrun, or a wrong count)."""


def make_accelerator(recipe: Recipe, plan: Plan):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    if plan.deepspeed_config is not None:
        mixed = "no"  # DeepSpeed runs the model in bf16/fp16 itself, from its config
    accelerator = Accelerator(
        cpu=plan.device == "cpu",
        mixed_precision=mixed,
        kwargs_handlers=[InitProcessGroupKwargs(backend=plan.backend, timeout=collective_timeout(recipe))],
    )
    # The silent trap of CPU launches: N processes that each believe they are alone.
    if accelerator.num_processes != plan.world_size:
        raise WorldMismatch(
            f"planned world size {plan.world_size} but this process sees {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}); were the ranks started by torchrun?"
        )
    return accelerator


def collective_timeout(recipe: Recipe):
    """distributed.collective_timeout, for the world group and for every group created later.

    DeepSpeed and FSDP reuse the world group Accelerate made, but a group made by `new_group` without a
    timeout (DeepSpeed's, a device mesh's) takes torch's module default (30 minutes), so that default is
    set too.
    """
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=recipe.distributed.collective_timeout)
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    return timeout


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    cfg = recipe.train.optimizer
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    apply_optimizer_settings(optimizer, recipe)
    return optimizer


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, recipe: Recipe) -> None:
    """The recipe's lr, betas, eps and weight decay on the optimizer's two groups (decayed, not decayed): when
    it is made, and again after a resume loaded the checkpoint's, so that changed settings take effect."""
    cfg = recipe.train.optimizer
    for group, weight_decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
        group.update(lr=cfg.lr, initial_lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=weight_decay)


def make_scheduler(optimizer, recipe: Recipe, plan: Plan, start_step: int = 0):
    """The learning-rate schedule, at `start_step`. It is a function of the step and the recipe, so a checkpoint
    holds none of it: a resumed run gets the schedule of its recipe (a new lr or max_steps takes effect)."""
    import warnings

    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[recipe.train.scheduler.name]
    apply_optimizer_settings(optimizer, recipe)
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps
    )  # fmt: skip
    if start_step:
        scheduler.last_epoch = start_step - 1
        with warnings.catch_warnings():  # "step() before optimizer.step()": positioning, not training
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()  # sets every group's lr to the schedule's value at start_step
    return scheduler


def shutdown(accelerator) -> None:
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def host_memory() -> tuple[int, int]:
    """(resident set now, its high-water mark) of this process in bytes, from /proc/self/status (VmRSS, VmHWM);
    (0, 0) where there is none. Host memory whatever the device: it is what loading the weights costs a node."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return 0, 0


def quiet_libraries(is_main: bool) -> None:
    """One copy of library warnings (rank 0's), in plain words and without colour codes (train.noise), and no
    per-file progress bars in the logs."""
    import datasets
    import transformers

    from launcher.train import noise

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning() if is_main else transformers.utils.logging.set_verbosity_error()
    noise.install(is_main)
