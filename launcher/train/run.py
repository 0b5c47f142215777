"""train.run(recipe, plan): the one training entry point every backend ends in.

Order: accelerator → pre-flight checks (train.preflight) → tokenizer and data → model → loss → optimizer/scheduler
→ resume → loop (train, evaluate, checkpoint, log) → export → summary.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from launcher.config.recipe import CrossEntropy, Recipe
from launcher.planning.data_files import label_counts, load_splits
from launcher.planning.plan import Plan
from launcher.train import checkpoint, preflight
from launcher.train.data import Collate, Sampler, balanced_row_probs, prepare, to_device
from launcher.train.engines import make_engine
from launcher.train.evaluate import Evaluator
from launcher.train.heartbeat import Heartbeat
from launcher.train.losses import build_loss, class_weights_from_counts
from launcher.train.model import build, forward_logits, load_tokenizer
from launcher.train.report import Reporter, StepLosses, rank_logger, truncate_metrics
from launcher.train.stop import EXIT_STOPPED, StopRequest

# Failure drills: "rank=R,step=S,phase=step|eval|save|write[,kind=kill|raise|hang][,once=PATH]" makes that rank
# die there (SIGKILL, or an exception) or hang for ever (for the watchdog); write: inside checkpoint.save, this
# rank's files written, the folder not yet renamed. With once=PATH only the first time (PATH marks it done), so a
# backend that restarts the ranks by itself (Ray) gets past it. Used by the tests; also handy to rehearse recovery.
FAULT_ENV = "LAUNCHER_FAULT"


class WorldMismatch(RuntimeError):
    pass


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


def _hang() -> None:
    """The hang drill: a plain Python loop, so that the rank's stack dump shows this frame."""
    while True:
        time.sleep(0.05)


def _fault(rank: int, step: int, phase: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want = dict(part.split("=", 1) for part in spec.split(","))
    if int(want.get("rank", -1)) == rank and int(want.get("step", -1)) == step and want.get("phase", "step") == phase:
        if "once" in want:
            if os.path.exists(want["once"]):
                return
            Path(want["once"]).touch()
        if want.get("kind", "kill") == "raise":
            raise RuntimeError(f"injected failure at step {step} ({FAULT_ENV})")
        if want.get("kind") == "hang":
            _hang()
        os.kill(os.getpid(), signal.SIGKILL)


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    cfg = recipe.train.optimizer
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _scheduler(optimizer, recipe: Recipe, plan: Plan):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[recipe.train.scheduler.name]
    return get_scheduler(name, optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps)


def _param_checksum(tensors) -> float:
    return float(sum(t.double().sum().item() for t in tensors))


def run(recipe: Recipe, plan: Plan, on_checkpoint: Callable[[Path, dict], None] | None = None) -> dict:
    """on_checkpoint(folder, state) is called on every rank once a checkpoint is complete (Ray reports it)."""
    t_launch = float(os.environ.get("LAUNCHER_T0", time.time()))
    t_planned = float(os.environ.get("LAUNCHER_T_PLANNED", t_launch))
    t0 = time.time()
    stop = StopRequest()
    accelerator = make_accelerator(recipe, plan)
    t_pg = time.time()
    rank, world = accelerator.process_index, accelerator.num_processes
    log = rank_logger(rank)
    _quiet_libraries(accelerator.is_main_process)
    # the peers, checked before anything heavy is loaded; PreflightFailed on every rank when a check fails
    t_checks = time.time()
    hosts = preflight.check(recipe, plan, rank, world, accelerator.device)
    t_preflight = time.time()
    if recipe.preflight.run == "only":
        _shutdown(accelerator)
        return {"status": "preflight passed", "hosts": hosts}
    log.info(
        f"world size {world} ({accelerator.distributed_type.value}, backend {plan.backend}), device "
        f"{accelerator.device}, strategy {plan.strategy_label}, hosts {', '.join(hosts)}"
    )
    run_dir = Path(recipe.output_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    beat = Heartbeat(run_dir, rank, accelerator.local_process_index, bool(recipe.distributed.hang_timeout))

    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe)
    splits = load_splits(recipe)
    data = prepare(recipe, splits, tokenizer)
    t_data = time.time()
    memory_before_model = _peak_memory_bytes()
    engine = make_engine(accelerator, recipe, plan)
    model = build(recipe, tokenizer, accelerator.device)
    t_model = time.time()
    task = recipe.task.type
    loss_cfg = recipe.task.resolved_loss
    class_weights = None
    if isinstance(loss_cfg, CrossEntropy) and loss_cfg.class_weights is not None:
        class_weights = (
            class_weights_from_counts(label_counts(splits.train, recipe.task.resolved_num_labels))
            if loss_cfg.class_weights == "auto"
            else list(loss_cfg.class_weights)
        )
        log.info(f"class weights: {[round(w, 4) for w in class_weights]}")
    loss_fn = build_loss(task, loss_cfg, class_weights)
    model = engine.prepare(model, lambda m: _optimizer(m, recipe))
    scheduler = _scheduler(engine.base_optimizer, recipe, plan)
    accelerator.register_for_checkpointing(scheduler)
    collate = Collate(tokenizer, task)
    evaluator = Evaluator(accelerator, model, loss_fn, collate, recipe, plan)

    start_step, first_loss, last_loss, resumed_from, resumed_world_size = 0, None, None, None, None
    found, _ = checkpoint.newest_intact(run_dir, recipe.train.resume)  # the launcher's choice, made again here
    if found is not None:
        state = checkpoint.check_compatible(found, recipe, plan)
        accelerator.load_state(str(found))
        engine.load(found, state["world_size"])
        start_step, resumed_from = state["step"], str(found)
        first_loss, last_loss = state.get("first_loss"), state.get("last_loss")
        resumed_world_size = state["world_size"]
        log.info(f"resumed from {found} at step {start_step}")
        note = checkpoint.world_size_note(state, world)
        if note:
            log.info(note)
        if checkpoint.restore_missing_rng(found, rank, recipe.train.seed, start_step):
            log.info(f"no saved random state for rank {rank}: seeded from (seed, step, rank)")
    if accelerator.is_main_process:  # steps after the checkpoint (all, when a killed run had none) are run again
        truncate_metrics(run_dir, start_step)
    accelerator.wait_for_everyone()

    train_rows = data["train"]
    weights = np.array([r["weight"] for r in train_rows], dtype=np.float64)
    row_probs = balanced_row_probs([r["labels"] for r in train_rows]) if recipe.data.balance else None
    sampler = Sampler(plan, recipe.data.seed, weights, row_probs)
    reporter = Reporter(
        run_dir,
        accelerator.is_main_process,
        plan.total_steps,
        start_step,
        recipe.train.log_every,
        recipe.train.tensorboard,
        log,
    )
    eval_every = plan.steps_per_epoch if recipe.train.eval_every == "epoch" else recipe.train.eval_every
    model.train()
    losses = StepLosses(accelerator, reporter, plan, first_loss, last_loss)
    t_first_step, t_train = None, time.time()
    cpu_train = time.process_time()

    def state_at(step: int) -> dict:
        return {
            "step": step,
            "epoch": step / plan.steps_per_epoch,
            "samples_seen": step * plan.global_batch_size,
            "world_size": world,
            "first_loss": losses.first,
            "last_loss": losses.last,
            "fingerprint": checkpoint.fingerprint(recipe),
            "plan": plan.model_dump(),
        }

    def save(step: int, phase: str = "save") -> None:
        beat(step, phase)
        losses.flush()
        _fault(rank, step, "save")
        state = state_at(step)
        folder = checkpoint.save(
            accelerator,
            run_dir,
            step,
            state,
            recipe.train.keep_last,
            engine=engine,
            hash_files=recipe.train.checkpoint_hash,
            written=lambda: _fault(rank, step, "write"),
        )
        if on_checkpoint is not None:
            on_checkpoint(folder, state)

    for step in range(start_step, plan.total_steps):
        beat(step + 1, "data")
        _fault(rank, step + 1, "step")
        batch_plan = sampler.batch(step, rank)
        loss_sum = torch.zeros((), dtype=torch.float32, device=accelerator.device)
        for a, indices in enumerate(batch_plan.micro_batches):
            batch = to_device(collate([train_rows[i] for i in indices]), accelerator.device)
            sync = a == len(batch_plan.micro_batches) - 1
            beat(step + 1, "forward")
            with engine.accumulating(sync), accelerator.autocast():
                micro_sum = loss_fn(forward_logits(model, batch, task), batch["labels"])
            beat(step + 1, "backward")
            # Every strategy averages gradients over ranks, so scale by world / global terms to get the global mean.
            engine.backward(micro_sum * world / batch_plan.global_weight, sync)
            loss_sum += micro_sum.detach().float()
        beat(step + 1, "optimizer")
        grad_norm = engine.step()
        scheduler.step()
        done = step + 1
        if t_first_step is None:
            t_first_step = time.time()
        losses.add(done, loss_sum, batch_plan.global_weight, scheduler.get_last_lr()[0], grad_norm)
        reporter.tick(done)
        if done % recipe.train.log_every == 0:
            losses.flush()
        if eval_every and done % eval_every == 0 and done != plan.total_steps and splits.validation:
            losses.flush()
            beat(done, "eval")
            _fault(rank, done, "eval")
            reporter.evaluation(done, "validation", evaluator(data["validation"], beat.advance))
        saved = recipe.train.save_every and done % recipe.train.save_every == 0 and done != plan.total_steps
        if saved:
            save(done)
        beat(done, "stop-sync")
        if done != plan.total_steps and stop.agreed(accelerator.device):
            if not saved:
                save(done)
            reporter.close()  # save() returned on every rank only once the checkpoint was in place
            log.info(f"stop requested by signal: checkpoint of step {done} written, exiting with {EXIT_STOPPED}")
            _shutdown(accelerator)
            beat(done, "done")
            raise SystemExit(EXIT_STOPPED)
    t_train_end = time.time()
    cpu_train_end = time.process_time()
    memory_peak = _peak_memory_bytes()
    steps_run = plan.total_steps - start_step
    if steps_run:
        save(plan.total_steps, "final-save")

    results = {}
    for split in ("validation", "test"):
        if getattr(splits, split):
            beat(plan.total_steps, "final-eval")
            _fault(rank, plan.total_steps, "eval")
            results[split] = evaluator(data[split], beat.advance)
            reporter.evaluation(plan.total_steps, split, results[split])
    reporter.close()
    beat(plan.total_steps, "export")

    checksums = [
        float(x)
        for x in accelerator.gather(
            torch.tensor([_param_checksum(engine.local_tensors())], dtype=torch.float64, device=accelerator.device)
        ).tolist()
    ]
    held = accelerator.gather(torch.tensor([engine.held()], dtype=torch.int64, device=accelerator.device)).tolist()
    adapter_norms = engine.trainable_norms() if recipe.model.lora is not None else None
    final_dir = run_dir / "final"
    full_state = engine.full_state_dict()  # a collective under zero3/fsdp
    if accelerator.is_main_process:
        checkpoint.export(engine.unwrapped(), tokenizer, final_dir, full_state)
    accelerator.wait_for_everyone()
    train_wall = t_train_end - t_train
    summary = {
        "status": "completed",
        "world_size": world,
        "distributed_type": accelerator.distributed_type.value,
        "backend": plan.backend,
        "hosts": hosts,
        "steps": plan.total_steps,
        "steps_this_launch": steps_run,
        "epochs": plan.total_steps / plan.steps_per_epoch,
        "samples_seen": plan.total_steps * plan.global_batch_size,
        "resumed_from": resumed_from,
        "resumed_world_size": resumed_world_size,  # the checkpoint's world size (may differ from world_size)
        "train_loss": {"first": losses.first, "last": losses.last},
        "metrics": results,
        "final_model": str(final_dir.resolve()),
        "param_checksum_per_rank": checksums,
        "strategy": plan.strategy_label,
        # what the strategy shards (ddp: nothing), and how much of it each rank holds: [local, whole]
        "sharded": engine.sharded,
        "held_per_rank": held,
        "adapter_norms": adapter_norms,  # LoRA: the trained values, to check the saved adapter against
        "plan": plan.model_dump(),
        # Peak bytes per rank (CUDA: allocated by torch; CPU: resident set), before the model and after training.
        "memory": {
            name: [int(x) for x in accelerator.gather(torch.tensor([value], device=accelerator.device)).tolist()]
            for name, value in (
                ("before_model_bytes_per_rank", memory_before_model),
                ("peak_bytes_per_rank", memory_peak),
            )
        },
        "timings": {
            "time_to_first_step_s": (t_first_step - t_launch) if t_first_step else None,
            "recipe_and_plan_s": t_planned - t_launch,
            "rank_start_s": t0 - t_planned,
            "process_group_s": t_pg - t0,
            "preflight_s": t_preflight - t_checks,
            "data_prep_s": t_data - t_pg - (t_preflight - t_checks),  # library set-up, tokenizer, data
            "model_load_s": t_model - t_data,
            "first_step_s": (t_first_step - t_train) if t_first_step else None,
            "training_wall_s": train_wall,
            "training_cpu_s": cpu_train_end - cpu_train,  # this rank's CPU time: robust to a busy machine
            "samples_per_s": steps_run * plan.global_batch_size / train_wall if steps_run and train_wall > 0 else None,
        },
    }
    if accelerator.is_main_process:
        checkpoint.write_json_atomic(run_dir / "summary.json", summary)
        log.info(f"done: {plan.total_steps} steps, loss {losses.first} → {losses.last}; model in {final_dir}")
    _shutdown(accelerator)
    beat(plan.total_steps, "done")
    return summary


def _shutdown(accelerator) -> None:
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _quiet_libraries(is_main: bool) -> None:
    """One copy of library warnings (rank 0's), and no per-file progress bars in the logs."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning() if is_main else transformers.utils.logging.set_verbosity_error()
