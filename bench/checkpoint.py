"""Checkpoint stall: how long a checkpoint save holds the training loop under fsdp, written in the background
(torch DCP async_save, train.checkpoint_async: true) against the same save written synchronously (false).

Each mode is a real `launch --procs 2` run (CPU: 2 gloo ranks; GPU box: one rank per GPU) of the same recipe,
with a checkpoint every SAVE_EVERY steps (a background write has those steps to finish before the next save
waits for it); the modes alternate over the rounds. summary.json's
timings.checkpoint_saves_s has, per save, the seconds it held rank 0's loop (a background write: copying the
shards to host memory, and waiting for the write before it, if still running). The last save of a run waits
for its own write (the run ends there), so only the periodic saves are compared. Target (issue 17): the
background save stalls the loop for at most 10 % of the synchronous one. Training wall is printed too: on a
machine with few cores the background write competes with the training for them.

    python -m bench.checkpoint           # ~26M-parameter Llama, 16 steps, a checkpoint every 4, 3 rounds
    python -m bench.checkpoint --smoke
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys

from bench.common import (
    arguments,
    bench_env,
    causal_lm_recipe,
    fixed_length_lm_data,
    launch_cmd,
    llama_folder,
    print_table,
    ranks,
    ratio,
    run,
    save_result,
    sizes,
    threads_per_rank,
    work_dir,
)
from bench.memory import BATCH, MODEL_FULL, MODEL_SMOKE, SEQ_LEN

FULL = {"procs": 2, "steps": 16, "rounds": 3, "save_every": 4}
SMOKE = {"procs": 1, "steps": 3, "rounds": 1, "save_every": 1}
MODES = {"synchronous": False, "background": True}


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], **FULL).parse_args(argv)
    size = sizes(args, FULL, SMOKE)
    model_size = MODEL_SMOKE if args.smoke else MODEL_FULL
    work = work_dir(args, "checkpoint")
    procs, gpus = ranks(size["procs"])
    model = llama_folder(work, model_size, SEQ_LEN)
    data = fixed_length_lm_data(work, size["steps"] * BATCH, SEQ_LEN, model_size.vocab)
    env = bench_env(None if gpus else threads_per_rank(procs))
    saves: dict[str, list[float]] = {mode: [] for mode in MODES}
    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(size["rounds"]):
        for mode, background in MODES.items():
            out_dir = work / f"out-{mode}"
            recipe = causal_lm_recipe(
                work / f"{mode}.yaml",
                model=model,
                train=data,
                output_dir=out_dir,
                seq_len=SEQ_LEN,
                batch_size=BATCH,
                max_steps=size["steps"],
                strategy="fsdp",
                extra={"train.save_every": size["save_every"], "train.checkpoint_async": background},
            )
            shutil.rmtree(out_dir, ignore_errors=True)
            run(launch_cmd(recipe, "--procs", str(procs)), env, 1800)
            timings = json.loads((out_dir / "summary.json").read_text())["timings"]
            saves[mode] += timings["checkpoint_saves_s"][:-1]  # the periodic ones; the last waits for its write
            walls[mode].append(timings["training_wall_s"])
    sync = statistics.median(saves["synchronous"])
    rows = [
        [
            mode,
            len(saves[mode]),
            statistics.median(saves[mode]),
            max(saves[mode]),
            statistics.median(walls[mode]),
            ratio(statistics.median(saves[mode]), sync),
        ]  # fmt: skip
        for mode in MODES
    ]
    stall = ratio(statistics.median(saves["background"]), sync)
    print_table(
        f"checkpoint stall under fsdp: {model_size.num_params() / 1e6:.1f}M-parameter Llama, {procs} ranks, "
        f"{size['steps']} steps, a checkpoint every {size['save_every']}, {size['rounds']} round(s)",
        ["mode", "saves", "median s the loop waited", "max s", "training wall s (median)", "÷ synchronous"],
        rows,
        [
            "per save: seconds it held rank 0's loop (summary.json timings.checkpoint_saves_s, the last save of "
            "each run left out: it waits for its write).",
            f"background ÷ synchronous = {stall:.3f} (target ≤ 0.10)",
        ],
    )
    save_result(
        work,
        {
            "model": model_size.__dict__,
            "procs": procs,
            "size": size,
            "saves_s": saves,
            "training_wall_s": walls,
            "stall_ratio": stall,
        },  # fmt: skip
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
