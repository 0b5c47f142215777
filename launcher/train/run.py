"""The run lifecycle every backend ends in, on every rank: start → set up → train → finish.

    start     the process group, then the pre-flight checks (train.preflight) before anything heavy
    set up    tokenizer and data, model and its engine (train.engines), loss, optimizer, resume point
    train     for each step: a train step, maybe evaluate, maybe save, stop early? stop requested?
    finish    the final checkpoint, validation and test evaluation (of the best checkpoint with
              train.final: best), the export, summary.json (train.summary)

Each concept has its own helper: the engine holds and updates the model, the task hooks (train.tasks)
tokenize and collate, the feed (train.feed) collates the next steps ahead, `phase` keeps the heartbeat
(train.heartbeat) and the failure drill (train.drills), the clock (train.clock) the timings, the throughput
(train.throughput) the tokens and MFU, the reporter (train.report) the logs, metrics and trackers
(train.trackers), the selection (train.selection) the best checkpoint and early stopping.
train.max_steps=0 (`launch eval`) sets up and goes straight to the evaluation: nothing is trained or saved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from launcher.config.recipe import Recipe
from launcher.errors import ExitCode
from launcher.planning.plan import Plan
from launcher.records import CheckpointState, Summary, headline
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
from launcher.train.data import Collate, open_training_data
from launcher.train.drills import Drill
from launcher.train.engines import make_engine
from launcher.train.evaluate import Evaluator
from launcher.train.feed import Feed
from launcher.train.heartbeat import Heartbeat
from launcher.train.losses import LossContext, build_loss
from launcher.train.model import load_tokenizer
from launcher.train.packing import Collator, make_batches
from launcher.train.report import Reporter, StepLosses, rank_logger, truncate_metrics
from launcher.train.selection import Selection
from launcher.train.stop import StopRequest
from launcher.train.summary import run_summary
from launcher.train.tasks import hooks
from launcher.train.throughput import ModelFlops, Throughput
from launcher.train.trackers import Trackers, run_info
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
        self.recipe, self.plan, self.on_checkpoint, self.facts = recipe, plan, on_checkpoint, facts
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
        # the cache entries written before the ranks started, memory-mapped (train.data)
        self.data = open_training_data(recipe, plan, self.task, self.log.info, self.beat.advance)
        self.splits = self.data  # .train / .validation / .test: the splits, for what is run and evaluated
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
        self.fingerprint = compatibility.fingerprint(recipe, plan)
        first, last = self.resume()
        state = self.resumed_state
        # after the resume: the schedule is the recipe's at this step, whatever the checkpoint's optimizer held
        self.scheduler = make_scheduler(self.engine.base_optimizer, recipe, plan, self.start_step)
        self.selection = Selection(recipe.train, state.selection if state else None)
        self.batches = make_batches(plan, recipe, self.data)  # data.packing / group_by_length
        self.throughput = Throughput(acc, flops, plan.peak_tflops, recipe.distributed.straggler_factor, self.log,
                                     tokens_before=(state.tokens_seen or 0) if state else 0)  # fmt: skip
        trackers = self.start_trackers() if acc.is_main_process and recipe.train.trackers else None
        self.reporter = Reporter(
            self.run_dir, acc.is_main_process, self.end_step, self.start_step, recipe.train.log_every, self.log,
            trackers,
        )  # fmt: skip
        self.losses = StepLosses(acc, self.reporter, plan, first, last, window=self.throughput.flush)
        self.last_saved = self.start_step if state else None
        self.last_validation: tuple[int | None, dict] = (None, {})
        self.eval_every = plan.steps_per_epoch if recipe.train.eval_every == "epoch" else recipe.train.eval_every

    def train_label_counts(self) -> list[int]:
        return self.data.label_counts(self.recipe.task.resolved_num_labels)

    def start_trackers(self) -> Trackers:
        """Rank 0's tracker runs: continued from the checkpoint's ids on resume, else new ones."""
        state, recipe = self.resumed_state, self.recipe
        info = run_info(recipe, self.plan, self.facts, self.hosts, self.run_dir)
        resumed = state.trackers if state else None
        return Trackers(recipe.train.trackers, self.run_dir, resumed, recipe.train.resume == "never", info, self.log)

    def resume(self) -> tuple[float | None, float | None]:
        """Load the checkpoint the launcher chose (chosen again here, by the same rule); the first and last
        losses it recorded. Metric lines of steps after it are forgotten: those steps run again. A run that
        early stopping ended trains no further (end_step). train.max_steps=0 evaluates: no checkpoint."""
        self.start_step, self.resumed_from, self.resumed_world_size, self.resumed_state = 0, None, None, None
        self.end_step = self.plan.total_steps
        first = last = None
        evaluate_only = self.plan.total_steps == 0
        found = None if evaluate_only else checkpoint.newest_intact(self.run_dir, self.recipe.train.resume)[0]
        if found is not None:
            state = self.resumed_state = self.load(found)
            with safe_loading():  # the RNG state's numpy types are allow-listed there (train.unpickling)
                seeded = checkpoint.restore_rng(found, self.rank, self.recipe.train.seed, state.step)
            self.start_step, self.resumed_from, self.resumed_world_size = state.step, str(found), state.world_size
            if state.stopped_early:
                self.end_step = state.step
            first, last = state.first_loss, state.last_loss
            self.log.info(f"resumed from {found} at step {self.start_step}")
            changes = compatibility.settings_changes(state, self.recipe)
            notes = [compatibility.world_size_note(state, self.world)] + [f"takes effect: {c}" for c in changes]
            for note in filter(None, notes):
                self.log.info(note)
            if seeded:
                self.log.info(f"no saved random state for rank {self.rank}: seeded from (seed, step, rank)")
        if self.acc.is_main_process and not evaluate_only:  # steps after the checkpoint are run again
            truncate_metrics(self.run_dir, self.start_step, self.log)
        self.acc.wait_for_everyone()
        return first, last

    def load(self, folder: Path) -> CheckpointState:
        """Every rank loads the checkpoint `folder` (model, optimizer; sharded states), nothing in it running
        code: weights_only for every torch.load, whatever the library asks (train.unpickling)."""
        state = compatibility.check_compatible(folder, self.recipe, self.plan)
        with safe_loading():
            self.acc.load_state(str(folder))
            self.engine.load(folder, state.world_size)
        return state

    # ----------------------------------------------------------------------------- train
    def train(self) -> None:
        end = self.end_step
        self.model.train()
        self.clock.mark("train_start")
        self.clock.mark_cpu("train_start")
        # the next steps' batches are collated on a thread while this one trains (train.feed)
        self.feed = Feed(self.batches, self.data["train"], Collator(self.task, self.recipe), self.acc.device,
                         self.rank, self.start_step, end)  # fmt: skip
        for step in range(self.start_step, end):
            done = step + 1
            self.train_step(step)
            best = self.maybe_evaluate(done)  # a new best checkpoint to keep (train.keep_best)?
            stopping = done != end and self.selection.should_stop()  # early stopping: every rank alike
            due = bool(self.recipe.train.save_every) and done % self.recipe.train.save_every == 0
            saved = done != end and (due or best or stopping)
            if saved:
                self.save(done, stopped_early=stopping)
            self.settle_checkpoint(wait=False)
            if stopping:
                self.stop_early(done)
                break
            self.phase(done, "stop-sync")
            if done != end and self.stop.agreed(self.acc.device):
                self.stop_here(done, saved)
        self.feed.close()
        self.clock.mark("train_end")
        self.clock.mark_cpu("train_end")
        self.memory_peak = peak_memory_bytes()

    def maybe_evaluate(self, done: int) -> bool:
        """Validation every eval_every steps (the last step's is finish's); whether it is a new best."""
        if not (self.eval_every and done % self.eval_every == 0 and done != self.end_step and self.splits.validation):
            return False
        self.losses.flush()
        self.phase(done, "eval")
        results = self.evaluator(self.data["validation"], self.beat.advance)
        self.reporter.evaluation(done, "validation", results)
        self.last_validation = (done, results)
        return self.selection.observe(done, results)

    def stop_early(self, step: int) -> None:
        """Every rank saw the same validation metrics, so every rank stops here, at the same step."""
        if self.acc.is_main_process:
            self.log.info(f"early stopping at step {step}: {self.selection.why_stopped()}")
        self.end_step = step

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

    def save(self, step: int, phase: str = "save", stopped_early: bool = False) -> None:
        self.losses.flush()  # and the throughput's window: tokens_seen is up to this step
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
            tokens_seen=self.throughput.tokens_seen,
            selection=self.selection.state(),
            stopped_early=stopped_early,
            trackers=self.reporter.trackers.ids() if self.reporter.trackers else {},
        )
        began = time.perf_counter()
        self.settle_checkpoint(wait=True)  # at most one checkpoint is written in the background
        best = self.selection.best  # train.keep_best: never pruned
        args = (self.acc, self.run_dir, step, state, self.recipe.train.keep_last)
        options = {
            "hash_files": self.recipe.train.checkpoint_hash,
            "written": lambda: self.drill(step, "write"),
            "note": self.log.info,
            "keep": [checkpoint.folder_of(self.run_dir, best.step)] if best else [],
        }
        if self.engine.saves_in_background and self.recipe.train.checkpoint_async:
            self.background = save_in_background(*args, self.engine, **options)
        else:
            self.checkpointed(checkpoint.save(*args, engine=self.engine, **options), state)
        if phase == "final-save":
            self.settle_checkpoint(wait=True)
        self.last_saved = step
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
        self.reporter.close(finished=False)  # the checkpoint is in place on every rank
        self.log.info(
            f"stop requested by signal: checkpoint of step {step} written, exiting with {int(ExitCode.STOPPED)}"
        )
        shutdown(self.acc)
        self.beat(step, "done")
        raise SystemExit(int(ExitCode.STOPPED))

    # ----------------------------------------------------------------------------- finish
    def finish(self) -> Summary:
        last, acc = self.end_step, self.acc
        steps_run = last - self.start_step
        if steps_run and self.last_saved != last:
            self.save(last, "final-save")  # waits for its background write
        self.settle_checkpoint(wait=True)  # early stopping's checkpoint may still be written in the background
        results = {}
        if self.last_validation[0] == last:  # early stopping evaluated this very model a moment ago
            results["validation"] = self.last_validation[1]
        elif self.splits.validation:  # the last model's validation: a candidate for the best checkpoint too
            results["validation"] = self.final_evaluation(last, "validation")
            self.selection.observe(last, results["validation"])
        best = self.selection.best
        self.final_step = last
        if self.recipe.train.final == "best" and best is not None and best.step != last:
            self.load(checkpoint.folder_of(self.run_dir, best.step))
            if acc.is_main_process:
                self.log.info(f"final/ holds the best checkpoint: step {best.step} ({best.metric} {best.value:.4g})")
            self.final_step, results["validation"] = best.step, best.metrics
        if self.splits.test:
            results["test"] = self.final_evaluation(last, "test")
        self.reporter.close()
        self.beat(last, "export")
        final_dir = self.run_dir / "final" if self.plan.total_steps else None  # max_steps=0: nothing to export
        summary = run_summary(self, results, final_dir, steps_run)  # gathers: every rank, before the export
        if final_dir is not None:
            full_state = self.engine.full_state_dict()  # a collective under zero3/fsdp
            if acc.is_main_process:
                checkpoint.export(self.engine.unwrapped(), self.tokenizer, final_dir, full_state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            summary.write(self.run_dir / "summary.json")
            where = f"; model in {final_dir}" if final_dir is not None else ""
            self.log.info(f"done: {headline(summary)}{where}")
        shutdown(acc)
        self.beat(last, "done")
        return summary

    def final_evaluation(self, step: int, split: str) -> dict:
        self.phase(step, "final-eval")
        results = self.evaluator(self.data[split], self.beat.advance)
        self.reporter.evaluation(step, split, results)
        return results
