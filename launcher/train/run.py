"""The run lifecycle every backend ends in, on every rank: start → set up → train → finish.

    start     the process group, then the pre-flight checks (train.preflight) before anything heavy
    set up    tokenizer and data, model and its engine (train.engines), loss, optimizer, resume point
    train     for each step: a train step, maybe evaluate, maybe save, stop requested?
    finish    the final checkpoint, validation and test evaluation, the export, summary.json

Each concept has its own helper: the engine holds and updates the model, the task hooks (train.tasks)
tokenize and collate, `phase` keeps the heartbeat (train.heartbeat) and the failure drill (train.drills),
the clock (train.clock) the timings, the reporter (train.report) the logs and metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from launcher.config.recipe import Recipe
from launcher.errors import ExitCode
from launcher.planning.data_files import label_counts, load_splits
from launcher.planning.plan import Plan
from launcher.records import CheckpointState, LossEnds, Summary
from launcher.spec import LaunchFacts
from launcher.train import checkpoint, compatibility, preflight
from launcher.train.background_checkpoint import Background, save_in_background
from launcher.train.clock import Clock
from launcher.train.components import (
    host_memory,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    peak_memory_bytes,
    quiet_libraries,
    shutdown,
)
from launcher.train.data import Collate, check_planned_rows, prepare
from launcher.train.drills import Drill
from launcher.train.engines import make_engine
from launcher.train.evaluate import Evaluator
from launcher.train.feed import Feed
from launcher.train.heartbeat import Heartbeat
from launcher.train.losses import LossContext, build_loss
from launcher.train.model import load_tokenizer
from launcher.train.packing import Collator, make_batches
from launcher.train.report import Reporter, StepLosses, rank_logger, truncate_metrics
from launcher.train.stop import StopRequest
from launcher.train.tasks import hooks
from launcher.train.throughput import ModelFlops, Throughput
from launcher.train.unpickling import safe_loading

OnCheckpoint = Callable[[Path, CheckpointState], None]
# heartbeat phase → the failure drill that fires on entering it (train.drills; "write" fires inside the save)
DRILL_POINTS = {"data": "step", "eval": "eval", "final-eval": "eval", "save": "save", "final-save": "save"}


def run(
    recipe: Recipe, plan: Plan, facts: LaunchFacts | None = None, on_checkpoint: OnCheckpoint | None = None
) -> Summary | None:
    """Train on this rank; the summary (None when only the pre-flight checks ran). `on_checkpoint(folder,
    state)` is called on every rank once a checkpoint is complete (Ray reports it)."""
    return Run(recipe, plan, facts or LaunchFacts.now(), on_checkpoint).execute()


class Run:
    def __init__(self, recipe: Recipe, plan: Plan, facts: LaunchFacts, on_checkpoint: OnCheckpoint | None):
        self.recipe, self.plan, self.on_checkpoint = recipe, plan, on_checkpoint
        self.clock = Clock(facts)
        self.stop = StopRequest()  # early: the default action of USR1 kills
        self.run_dir = Path(recipe.output_dir)
        self.background: Background | None = None  # a checkpoint being written in the background

    def execute(self) -> Summary | None:
        self.start()
        if self.recipe.preflight.run == "only":
            shutdown(self.acc)
            return None
        self.set_up()
        self.train()
        return self.finish()

    # ----------------------------------------------------------------------------- start
    def start(self) -> None:
        recipe, plan = self.recipe, self.plan
        self.acc = make_accelerator(recipe, plan)
        self.clock.mark("process_group")
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.log = rank_logger(self.rank)
        quiet_libraries(self.acc.is_main_process)
        # the peers, checked before anything heavy is loaded; PreflightFailed on every rank when a check fails
        self.clock.mark("preflight_start")
        self.hosts = preflight.check(recipe, plan, self.rank, self.world, self.acc.device)
        self.clock.mark("preflight_end")

    # ----------------------------------------------------------------------------- set up
    def set_up(self) -> None:
        recipe, plan, acc = self.recipe, self.plan, self.acc
        self.log.info(
            f"world size {self.world} ({acc.distributed_type.value}, backend {plan.backend}), device "
            f"{acc.device}, strategy {plan.strategy_label}, hosts {', '.join(self.hosts)}"
        )
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.beat = Heartbeat(self.run_dir, self.rank, acc.local_process_index, bool(recipe.distributed.hang_timeout))
        self.drill = Drill(self.rank)
        from accelerate.utils import set_seed

        set_seed(recipe.train.seed)
        self.tokenizer = load_tokenizer(recipe)
        self.task = hooks(recipe, self.tokenizer)
        self.splits = load_splits(recipe)
        check_planned_rows(self.splits, plan)
        self.data = prepare(recipe, self.splits, self.tokenizer)
        self.clock.mark("data")
        self.memory_before_model = peak_memory_bytes()
        self.host_before_model = host_memory()  # loading = building the model until the engine holds it
        self.engine = make_engine(acc, recipe, plan)
        model = self.engine.build_model(recipe, self.tokenizer)
        self.clock.mark("model")
        flops = ModelFlops.of(model)  # before the engine shards it
        self.task.configure(plan)
        context = LossContext(recipe.task.spec, self.train_label_counts, self.log.info)
        self.loss_fn = build_loss(recipe.task.resolved_loss, context)
        self.model = self.engine.prepare(model, lambda m: make_optimizer(m, recipe))
        self.host_after_load = host_memory()
        # a reference model, built as the engine builds the trained one (fsdp: read by rank 0 only)
        note = self.task.set_up(self.engine, lambda: self.engine.build_model(recipe, self.tokenizer))
        if note:
            self.log.info(note)
        self.collate = Collate(self.task)
        self.evaluator = Evaluator(acc, self.model, self.loss_fn, self.collate, self.task, recipe, plan)
        self.fingerprint = compatibility.fingerprint(recipe, self.splits)
        first, last = self.resume()
        # after the resume: the schedule is the recipe's at this step, whatever the checkpoint's optimizer held
        self.scheduler = make_scheduler(self.engine.base_optimizer, recipe, plan, self.start_step)
        self.batches = make_batches(plan, recipe, self.data["train"])  # data.packing / group_by_length
        self.throughput = Throughput(acc, flops, plan.peak_tflops, recipe.distributed.straggler_factor, self.log)
        self.reporter = Reporter(
            self.run_dir, acc.is_main_process, plan.total_steps, self.start_step, recipe.train.log_every,
            recipe.train.tensorboard, self.log,
        )  # fmt: skip
        self.losses = StepLosses(acc, self.reporter, plan, first, last, window=self.throughput.flush)
        self.eval_every = plan.steps_per_epoch if recipe.train.eval_every == "epoch" else recipe.train.eval_every

    def train_label_counts(self) -> list[int]:
        return label_counts(self.splits.train, self.recipe.task.resolved_num_labels)

    def resume(self) -> tuple[float | None, float | None]:
        """Load the checkpoint the launcher chose (chosen again here, by the same rule); the first and last
        losses it recorded. Metric lines of steps after it are forgotten: those steps run again."""
        self.start_step, self.resumed_from, self.resumed_world_size = 0, None, None
        first = last = None
        found, _ = checkpoint.newest_intact(self.run_dir, self.recipe.train.resume)
        if found is not None:
            state = compatibility.check_compatible(found, self.recipe, self.plan, self.splits)
            with safe_loading():  # weights_only for every torch.load, whatever the library asks (train.unpickling)
                self.acc.load_state(str(found))
                self.engine.load(found, state.world_size)
                seeded = checkpoint.restore_rng(found, self.rank, self.recipe.train.seed, state.step)
            self.start_step, self.resumed_from, self.resumed_world_size = state.step, str(found), state.world_size
            first, last = state.first_loss, state.last_loss
            self.log.info(f"resumed from {found} at step {self.start_step}")
            changes = compatibility.settings_changes(state, self.recipe)
            notes = [compatibility.world_size_note(state, self.world)] + [f"takes effect: {c}" for c in changes]
            for note in filter(None, notes):
                self.log.info(note)
            if seeded:
                self.log.info(f"no saved random state for rank {self.rank}: seeded from (seed, step, rank)")
        if self.acc.is_main_process:  # steps after the checkpoint (all, when a killed run had none) are run again
            truncate_metrics(self.run_dir, self.start_step, self.log)
        self.acc.wait_for_everyone()
        return first, last

    # ----------------------------------------------------------------------------- train
    def train(self) -> None:
        total = self.plan.total_steps
        self.model.train()
        self.clock.mark("train_start")
        self.clock.mark_cpu("train_start")
        # the next steps' batches are collated on a thread while this one trains (train.feed)
        self.feed = Feed(self.batches, self.data["train"], Collator(self.task, self.recipe), self.acc.device,
                         self.rank, self.start_step, total)  # fmt: skip
        for step in range(self.start_step, total):
            done = step + 1
            self.train_step(step)
            if self.eval_every and done % self.eval_every == 0 and done != total and self.splits.validation:
                self.losses.flush()
                self.phase(done, "eval")
                self.reporter.evaluation(done, "validation", self.evaluator(self.data["validation"], self.beat.advance))
            saved = bool(self.recipe.train.save_every) and done % self.recipe.train.save_every == 0 and done != total
            if saved:
                self.save(done)
            self.settle_checkpoint(wait=False)
            self.phase(done, "stop-sync")
            if done != total and self.stop.agreed(self.acc.device):
                self.stop_here(done, saved)
        self.feed.close()
        self.clock.mark("train_end")
        self.clock.mark_cpu("train_end")
        self.memory_peak = peak_memory_bytes()

    def train_step(self, step: int) -> None:
        """One optimizer step over this rank's micro-batches of the global batch `step` (gradient accumulation)."""
        done = step + 1
        self.throughput.step_start()
        self.phase(done, "data")
        plan, waited = self.feed.get(step)
        self.throughput.data_ready(waited)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.acc.device)
        for a, batch in enumerate(plan.micro_batches):
            sync = a == len(plan.micro_batches) - 1
            if a == 0:
                self.throughput.model_start()
            self.phase(done, "forward")
            with self.engine.accumulating(sync), self.acc.autocast():
                micro_sum = self.task.loss(self.model, batch, self.loss_fn)
            self.phase(done, "backward")
            # Every strategy averages gradients over ranks, so scale by world / global terms to get the global mean.
            self.engine.backward(micro_sum * self.world / plan.global_weight, sync)
            loss_sum += micro_sum.detach().float()
        self.phase(done, "optimizer")
        grad_norm = self.engine.step()
        self.scheduler.step()
        self.throughput.step_end(plan.counts)
        self.clock.mark("first_step")
        self.losses.add(done, loss_sum, plan.global_weight, self.scheduler.get_last_lr()[0], grad_norm)
        self.reporter.tick(done)
        if done % self.recipe.train.log_every == 0:
            self.losses.flush()

    def phase(self, step: int, name: str) -> None:
        """Entering phase `name` of `step`: the heartbeat notes it; a failure drill set for it fires."""
        self.beat(step, name)
        if name in DRILL_POINTS:
            self.drill(step, DRILL_POINTS[name])

    def save(self, step: int, phase: str = "save") -> None:
        self.losses.flush()
        self.phase(step, phase)
        plan = self.plan
        state = CheckpointState(
            step=step,
            epoch=step / plan.steps_per_epoch,
            samples_seen=step * plan.global_batch_size,
            world_size=self.world,
            first_loss=self.losses.first,
            last_loss=self.losses.last,
            fingerprint=self.fingerprint,
            settings=compatibility.train_settings(self.recipe),
            plan=plan.model_dump(),
        )
        began = time.perf_counter()
        self.settle_checkpoint(wait=True)  # at most one checkpoint is written in the background
        args = (self.acc, self.run_dir, step, state, self.recipe.train.keep_last)
        options = {"hash_files": self.recipe.train.checkpoint_hash, "written": lambda: self.drill(step, "write"),
                   "note": self.log.info}  # fmt: skip
        if self.engine.saves_in_background and self.recipe.train.checkpoint_async:
            self.background = save_in_background(*args, self.engine, **options)
        else:
            self.checkpointed(checkpoint.save(*args, engine=self.engine, **options), state)
        if phase == "final-save":
            self.settle_checkpoint(wait=True)
        self.clock.saves.append(time.perf_counter() - began)

    def settle_checkpoint(self, wait: bool) -> None:
        """The checkpoint written in the background, once in place on every rank (`wait`: block until it is)."""
        pending = self.background
        if pending is not None and (wait or pending.done()):
            self.background = None
            self.checkpointed(pending.wait(), pending.state)

    def checkpointed(self, folder: Path, state: CheckpointState) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(folder, state)

    def stop_here(self, step: int, saved: bool) -> None:
        """Every rank agreed to stop at `step` (a USR1 reached one of them): checkpoint it, exit 75."""
        if not saved:
            self.save(step)
        self.settle_checkpoint(wait=True)
        self.feed.close()
        self.reporter.close()  # save() returned on every rank only once the checkpoint was in place
        self.log.info(
            f"stop requested by signal: checkpoint of step {step} written, exiting with {int(ExitCode.STOPPED)}"
        )
        shutdown(self.acc)
        self.beat(step, "done")
        raise SystemExit(int(ExitCode.STOPPED))

    # ----------------------------------------------------------------------------- finish
    def finish(self) -> Summary:
        total, acc = self.plan.total_steps, self.acc
        steps_run = total - self.start_step
        if steps_run:
            self.save(total, "final-save")  # waits for its background write
        results = {}
        for split in ("validation", "test"):
            if getattr(self.splits, split):
                self.phase(total, "final-eval")
                results[split] = self.evaluator(self.data[split], self.beat.advance)
                self.reporter.evaluation(total, split, results[split])
        self.reporter.close()
        self.beat(total, "export")
        final_dir = self.run_dir / "final"
        summary = self.summary(results, final_dir, steps_run)  # gathers: every rank, before the export
        full_state = self.engine.full_state_dict()  # a collective under zero3/fsdp
        if acc.is_main_process:
            checkpoint.export(self.engine.unwrapped(), self.tokenizer, final_dir, full_state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            summary.write(self.run_dir / "summary.json")
            self.log.info(f"done: {total} steps, loss {self.losses.first} → {self.losses.last}; model in {final_dir}")
        shutdown(acc)
        self.beat(total, "done")
        return summary

    def summary(self, results: dict, final_dir: Path, steps_run: int) -> Summary:
        acc, engine, plan = self.acc, self.engine, self.plan

        def gathered(value, dtype=None) -> list:
            return acc.gather(torch.tensor([value], dtype=dtype, device=acc.device)).tolist()

        checksum = float(sum(t.double().sum().item() for t in engine.local_tensors()))
        return Summary(
            status="completed",
            world_size=self.world,
            distributed_type=acc.distributed_type.value,
            backend=plan.backend,
            hosts=self.hosts,
            steps=plan.total_steps,
            steps_this_launch=steps_run,
            epochs=plan.total_steps / plan.steps_per_epoch,
            samples_seen=plan.total_steps * plan.global_batch_size,
            resumed_from=self.resumed_from,
            resumed_world_size=self.resumed_world_size,
            train_loss=LossEnds(first=self.losses.first, last=self.losses.last),
            metrics=results,
            final_model=str(final_dir.resolve()),
            param_checksum_per_rank=[float(x) for x in gathered(checksum, torch.float64)],
            strategy=plan.strategy_label,
            sharded=engine.sharded,
            held_per_rank=gathered(engine.held(), torch.int64),
            adapter_norms=engine.trainable_norms() if self.recipe.model.lora is not None else None,
            plan=plan.model_dump(),
            memory={
                "before_model_bytes_per_rank": [int(x) for x in gathered(self.memory_before_model)],
                "peak_bytes_per_rank": [int(x) for x in gathered(self.memory_peak)],
                # host resident set before the model was loaded, and its high-water mark once the engine held it
                # (what loading cost; bench/memory.py compares it with the planner's host RAM at load)
                "host_before_load_bytes_per_rank": [int(x) for x in gathered(self.host_before_model[0])],
                "host_peak_before_load_bytes_per_rank": [int(x) for x in gathered(self.host_before_model[1])],
                "host_peak_after_load_bytes_per_rank": [int(x) for x in gathered(self.host_after_load[1])],
            },
            timings=self.clock.timings(steps_run, plan.global_batch_size),
            throughput=self.throughput.summary(),
        )
