"""Step overhead: `launch` against a minimal hand-written Accelerate loop and against transformers' Trainer.

Same model (a Llama built from a config), same fixed-length data, global batch, precision, optimizer,
schedule, clipping and number of steps; all three run as real ranks under torch.distributed.run with the
same threads per rank. They run interleaved (A B C A B C ...) so a load change on the machine hits all
three alike, and every ratio compares medians from this one run.

Each trainer's samples/s is measured over the same window: from just before the first optimizer step to
the end of the last one (launch: summary.json's training_wall_s; the baselines time that loop the same way).
Beside wall-clock samples/s, samples per CPU-second of rank 0 over that window (time.process_time): on a
machine shared with other jobs the wall clock measures the neighbours as much as the trainer, CPU time
far less, so on CPU that ratio is the one to trust when the machine is busy.

    python -m bench.step_overhead            # CPU: 2 ranks; on a GPU box: one rank per GPU
    python -m bench.step_overhead --smoke    # tiny, for CI
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench.common import (
    LlamaSize,
    arguments,
    bench_env,
    causal_lm_recipe,
    fixed_length_lm_data,
    launch_cmd,
    llama_folder,
    median,
    print_table,
    ranks,
    ratio,
    run,
    save_result,
    sizes,
    threads_per_rank,
    torchrun_cmd,
    work_dir,
)

FULL = {"rounds": 3, "steps": 40, "batch": 16, "seq_len": 128, "procs": 2}
SMOKE = {"rounds": 1, "steps": 3, "batch": 4, "seq_len": 16, "procs": 1}
MODEL_FULL = LlamaSize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344, vocab=2000)
MODEL_SMOKE = LlamaSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=200)
TRAINERS = ("launch", "accelerate loop", "HF Trainer")


def one_run(trainer: str, recipe: Path, procs: int, result: Path, env: dict, timeout: float) -> tuple[dict, float]:
    """Train once; (timings as summary.json names them, wall time of the whole command)."""
    if trainer == "launch":
        wall = run(launch_cmd(recipe, "--procs", str(procs)), env, timeout)
        summary = json.loads((recipe.parent / "out-launch" / "summary.json").read_text())
        return summary["timings"], wall
    module = {"accelerate loop": "bench.baselines.accelerate_loop", "HF Trainer": "bench.baselines.hf_trainer"}[trainer]
    wall = run(torchrun_cmd(procs, module, recipe, result), env, timeout)
    return json.loads(result.read_text()), wall


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], **FULL).parse_args(argv)
    size = sizes(args, FULL, SMOKE)
    model_size = MODEL_SMOKE if args.smoke else MODEL_FULL
    work = work_dir(args, "step_overhead")
    procs, gpus = ranks(size["procs"])
    precision = "bf16" if gpus else "fp32"
    model = llama_folder(work, model_size, size["seq_len"])
    data = fixed_length_lm_data(work, size["steps"] * size["batch"], size["seq_len"], model_size.vocab)
    env = bench_env(None if gpus else threads_per_rank(procs))
    recipes = {}
    for trainer in TRAINERS:
        slug = trainer.split()[0].lower()
        recipes[trainer] = causal_lm_recipe(
            work / slug / "recipe.yaml",
            model=model,
            train=data,
            output_dir=work / slug / f"out-{slug}",
            seq_len=size["seq_len"],
            batch_size=size["batch"],
            max_steps=size["steps"],
            precision=precision,
        )
    speeds: dict[str, list[float]] = {t: [] for t in TRAINERS}
    per_cpu: dict[str, list[float]] = {t: [] for t in TRAINERS}
    walls: dict[str, list[float]] = {t: [] for t in TRAINERS}
    for _ in range(size["rounds"]):
        for trainer in TRAINERS:
            recipe = recipes[trainer]
            shutil.rmtree(recipe.parent / f"out-{recipe.parent.name}", ignore_errors=True)
            timings, wall = one_run(trainer, recipe, procs, recipe.parent / "result.json", env, timeout=900)
            speeds[trainer].append(timings["samples_per_s"])
            per_cpu[trainer].append(size["steps"] * size["batch"] / timings["training_cpu_s"])
            walls[trainer].append(wall)
            print(
                f"{trainer}: {speeds[trainer][-1]:.1f} samples/s, {per_cpu[trainer][-1]:.1f} samples/CPU-s, "
                f"command {wall:.1f} s",
                file=sys.stderr,
            )
    best = {t: median(speeds[t]) for t in TRAINERS}
    cpu = {t: median(per_cpu[t]) for t in TRAINERS}
    rows = [
        [
            t,
            best[t],
            min(speeds[t]),
            max(speeds[t]),
            ratio(best["launch"], best[t]),
            cpu[t],
            ratio(cpu["launch"], cpu[t]),
            median(walls[t]),
        ]
        for t in TRAINERS
    ]
    notes = [
        f"{size['rounds']} interleaved rounds; {procs} {'GPU' if gpus else 'CPU'} ranks, {precision}, "
        f"global batch {size['batch']}, seq {size['seq_len']}, {size['steps']} steps, Llama "
        f"{model_size.hidden}x{model_size.layers}. Targets: launch ≥ 0.97× the loop, ≥ 1.0× Trainer."
    ]
    print_table(
        "step overhead: samples/s (median of rounds)",
        [
            "trainer",
            "samples/s",
            "min",
            "max",
            "launch ÷ this",
            "samples per CPU-s (rank 0)",
            "launch ÷ this (CPU)",
            "command wall s",
        ],
        rows,
        notes,
    )
    save_result(
        work,
        {
            "size": size,
            "model": model_size.__dict__,
            "procs": procs,
            "precision": precision,
            "samples_per_s": speeds,
            "samples_per_cpu_s": per_cpu,
            "command_wall_s": walls,
            "ratio_launch_to_loop": ratio(best["launch"], best["accelerate loop"]),
            "ratio_launch_to_trainer": ratio(best["launch"], best["HF Trainer"]),
            "cpu_ratio_launch_to_loop": ratio(cpu["launch"], cpu["accelerate loop"]),
            "cpu_ratio_launch_to_trainer": ratio(cpu["launch"], cpu["HF Trainer"]),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
