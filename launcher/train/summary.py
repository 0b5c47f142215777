"""summary.json: what a finished run did, where its model is, and what it cost, gathered from every rank.

It leads with what a user reads first (the final evaluation per split, the best step, trained tokens, wall
time: launcher.records.headline is its closing line), then the run's layout, its parameters' checksums and
memory per rank, where the time went (train.clock) and the throughput (train.throughput).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from launcher.records import LossEnds, Summary
from launcher.train import checkpoint


def run_summary(run, results: dict, final_dir: Path | None, steps_run: int) -> Summary:
    """The summary of a train.run.Run at its end (collectives: every rank calls it, before the export)."""
    acc, engine, plan = run.acc, run.engine, run.plan

    def gathered(value, dtype=None) -> list:
        return acc.gather(torch.tensor([value], dtype=dtype, device=acc.device)).tolist()

    checksum = float(sum(t.double().sum().item() for t in engine.local_tensors()))
    best = run.selection.best
    if best is not None:
        best = best.model_copy(update={"checkpoint": str(checkpoint.folder_of(run.run_dir, best.step))})
    return Summary(
        status="completed",
        metrics=results,
        best=best,
        stopped_early_at=run.end_step if run.end_step < plan.total_steps else None,
        trained_tokens=run.throughput.tokens_seen,
        wall_time_s=round(time.time() - run.facts.started_at, 1),
        final_model=str(final_dir.resolve()) if final_dir is not None else None,
        final_step=run.final_step if final_dir is not None else None,
        world_size=run.world,
        distributed_type=acc.distributed_type.value,
        backend=plan.backend,
        hosts=run.hosts,
        steps=run.end_step,
        steps_this_launch=steps_run,
        epochs=run.end_step / plan.steps_per_epoch,
        samples_seen=run.end_step * plan.global_batch_size,
        resumed_from=run.resumed_from,
        resumed_world_size=run.resumed_world_size,
        train_loss=LossEnds(first=run.losses.first, last=run.losses.last),
        param_checksum_per_rank=[float(x) for x in gathered(checksum, torch.float64)],
        strategy=plan.strategy_label,
        sharded=engine.sharded,
        held_per_rank=gathered(engine.held(), torch.int64),
        adapter_norms=engine.trainable_norms() if run.recipe.model.lora is not None else None,
        plan=plan.model_dump(),
        memory={
            "before_model_bytes_per_rank": [int(x) for x in gathered(run.memory_before_model)],
            "peak_bytes_per_rank": [int(x) for x in gathered(run.memory_peak)],
            # host resident set before the model was loaded, and its high-water mark once the engine held it
            # (what loading cost; bench/memory.py compares it with the planner's host RAM at load)
            "host_before_load_bytes_per_rank": [int(x) for x in gathered(run.host_before_model[0])],
            "host_peak_before_load_bytes_per_rank": [int(x) for x in gathered(run.host_before_model[1])],
            "host_peak_after_load_bytes_per_rank": [int(x) for x in gathered(run.host_after_load[1])],
        },
        timings=run.clock.timings(steps_run, plan.global_batch_size),
        throughput=run.throughput.summary(),
    )
