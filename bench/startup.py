"""Start-up: time from `launch` to the first optimizer step, split into its parts, against torchrun of a
minimal script; and the wall time of `launch --help` and `launch --dry-run`.

The split comes from the run's own summary.json (timings measured on rank 0):
recipe + checks + plan (the `launch` front end, imports included) → process start (torchrun agent, rank
interpreters, imports) → process group (rendezvous) → data preparation (read + tokenize, or read the
tokenization cache) → model load → other set-up (optimizer, Accelerate prepare, resume check) → first step.
Data preparation is measured cold (an empty LAUNCHER_CACHE_DIR) and cached (the same directory again).
The three runs are interleaved, cold / cached / torchrun, several rounds; medians are shown.

    python -m bench.startup            # CPU: 2 ranks; on a GPU box: one rank per GPU
    python -m bench.startup --smoke
"""

from __future__ import annotations

import json
import shutil
import sys
import time

from bench.common import (
    LlamaSize,
    arguments,
    bench_env,
    causal_lm_recipe,
    launch_cmd,
    llama_folder,
    median,
    print_table,
    ranks,
    ratio,
    run,
    save_result,
    sizes,
    texts,
    threads_per_rank,
    torchrun_cmd,
    words,
    work_dir,
    write_jsonl,
)

FULL = {"rounds": 3, "rows": 20000, "seq_len": 64, "procs": 2}
SMOKE = {"rounds": 1, "rows": 200, "seq_len": 16, "procs": 1}
MODEL_FULL = LlamaSize(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, vocab=2000)
MODEL_SMOKE = LlamaSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=200)
PARTS = [
    ("recipe + checks + plan", "recipe_and_plan_s"),
    ("process start + imports", "rank_start_s"),
    ("process group (rendezvous)", "process_group_s"),
    ("pre-flight checks", "preflight_s"),
    ("data preparation", "data_prep_s"),
    ("model load", "model_load_s"),
    ("other set-up", "other_s"),
    ("first step", "first_step_s"),
    ("time to first step", "time_to_first_step_s"),
]


def launch_parts(timings: dict) -> dict:
    known = sum(timings[k] for _, k in PARTS if k not in ("other_s", "time_to_first_step_s"))
    return {**timings, "other_s": timings["time_to_first_step_s"] - known}


def torchrun_parts(result: dict) -> dict:
    return {
        "recipe_and_plan_s": 0.0,
        "rank_start_s": result["rank_start_s"] + result["imports_s"],
        "process_group_s": result["process_group_s"],
        "preflight_s": 0.0,
        "data_prep_s": 0.0,
        "model_load_s": result["model_load_s"],
        "other_s": 0.0,
        "first_step_s": result["first_step_s"],
        "time_to_first_step_s": result["time_to_first_step_s"],
    }


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], **FULL).parse_args(argv)
    size = sizes(args, FULL, SMOKE)
    model_size = MODEL_SMOKE if args.smoke else MODEL_FULL
    work = work_dir(args, "startup")
    procs, gpus = ranks(size["procs"])
    model = llama_folder(work, model_size, size["seq_len"])
    data = work / f"short-{size['rows']}.jsonl"
    if not data.exists():
        write_jsonl(data, [{"text": t} for t in texts(size["rows"], 8, 40, words(model_size.vocab), seed=1)])
    out_dir = work / "out"
    recipe = causal_lm_recipe(
        work / "recipe.yaml",
        model=model,
        train=data,
        output_dir=out_dir,
        seq_len=size["seq_len"],
        batch_size=16,
        max_steps=2,
        precision="bf16" if gpus else "fp32",
    )
    env = bench_env(None if gpus else threads_per_rank(procs))

    cli_walls: dict[str, list[float]] = {"launch --help": [], "launch --dry-run": []}
    parts: dict[str, list[dict]] = {"launch, cold data": [], "launch, cached data": [], "torchrun minimal": []}
    for r in range(size["rounds"]):
        cli_walls["launch --help"].append(run([sys.executable, "-m", "launcher.cli", "--help"], env, 120))
        cli_walls["launch --dry-run"].append(run(launch_cmd(recipe, "--procs", str(procs), "--dry-run"), env, 300))
        cache = work / f"cache-{r}"
        shutil.rmtree(cache, ignore_errors=True)
        for name in ("launch, cold data", "launch, cached data"):
            shutil.rmtree(out_dir, ignore_errors=True)
            run(launch_cmd(recipe, "--procs", str(procs)), {**env, "LAUNCHER_CACHE_DIR": str(cache)}, 900)
            parts[name].append(launch_parts(json.loads((out_dir / "summary.json").read_text())["timings"]))
        shutil.rmtree(cache, ignore_errors=True)
        result = work / "torchrun.json"
        run(
            torchrun_cmd(procs, "bench.baselines.minimal_torchrun", model, size["seq_len"], result),
            {**env, "BENCH_T0": repr(time.time())},
            600,
        )
        parts["torchrun minimal"].append(torchrun_parts(json.loads(result.read_text())))
        print(
            f"round {r + 1}: " + ", ".join(f"{n} {p[-1]['time_to_first_step_s']:.1f} s" for n, p in parts.items()),
            file=sys.stderr,
        )

    med = {name: {key: median([p[key] for p in runs]) for _, key in PARTS} for name, runs in parts.items()}
    rows = [
        [label]
        + [med[name][key] for name in parts]
        + [ratio(med["launch, cached data"][key], med["torchrun minimal"][key])]
        for label, key in PARTS
    ]
    print_table(
        f"start-up: seconds to the first optimizer step (median of {size['rounds']}, {procs} ranks)",
        ["part", *parts, "launch cached ÷ torchrun"],
        rows,
        [
            f"{size['rows']} texts, max_length {size['seq_len']}, Llama {model_size.hidden}x{model_size.layers}; "
            "torchrun minimal: import, init_process_group, from_pretrained + DDP, one AdamW step (no data)."
        ],
    )
    cli = {name: median(walls) for name, walls in cli_walls.items()}
    print_table(
        "launch front end: command wall time (s, median)",
        ["command", "seconds"],
        [[name, value] for name, value in cli.items()],
    )
    save_result(
        work,
        {
            "size": size,
            "model": model_size.__dict__,
            "procs": procs,
            "parts": parts,
            "cli_wall_s": cli_walls,
            "median": med,
            "cli_median_s": cli,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
