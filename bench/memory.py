"""Memory: per-rank peak memory under DDP, ZeRO-2, ZeRO-3 and FSDP for the same model, against the
planner's estimate (ratio measured ÷ estimated).

Each strategy is one real `launch --procs 2` run (CPU: 2 gloo ranks; GPU box: one rank per GPU). The run
reports, per rank, its peak memory before the model is loaded and after the last training step
(summary.json "memory": CUDA bytes allocated by torch, or the resident set on CPU). Measured = peak after
training − before the model: the model states (weights, gradients, optimizer states), activations and load transients.
Two yardsticks:
  * the planner's per-device estimate (launcher/planning/memory.py, issue 3), read by `planner_estimate`;
  * the textbook model states (DeepSpeed's estimator, fp32 Adam: 4 B weights + 4 B grads + 8 B Adam states
    per parameter, divided by the ranks each stage shards them over), to keep the ratio honest while the
    planner is absent.
A strategy the plan refuses (its training code not on this branch) is listed with the plan's message.

A second table measures loading the weights (issue 17): a ≥100M-parameter Llama under ddp (every rank reads
the weights) and fsdp (rank 0 reads them, the other ranks build on meta and receive their shards), 2 ranks.
Measured per rank = host resident-set high-water mark once the engine holds the model − resident set before
the model (summary.json "memory" host_*), against the planner's host RAM at load (planning/host_memory.py).
The smoke run reads that table from the first table's ddp and fsdp runs (one rank, tiny model).

    python -m bench.memory            # ~26M-parameter Llama, 2 ranks; then the load of a 134M one
    python -m bench.memory --smoke
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

from bench.common import (
    LlamaSize,
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

STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
# Which of (weights, gradients, optimizer states) each strategy shards over the ranks.
SHARDED = {
    "ddp": (False, False, False),
    "zero1": (False, False, True),
    "zero2": (False, True, True),
    "zero3": (True, True, True),
    "fsdp": (True, True, True),
}
FULL = {"procs": 2, "steps": 3}
SMOKE = {"procs": 1, "steps": 2}
MODEL_FULL = LlamaSize(hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1376, vocab=8000)
MODEL_SMOKE = LlamaSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=200)
MODEL_LOAD = LlamaSize(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048, vocab=32000)  # 134M
LOAD_STRATEGIES = ("ddp", "fsdp")
SEQ_LEN, BATCH = 32, 4
MIB = 2**20


def reference_model_states(num_params: int, strategy: str, world: int) -> float:
    weights, grads, states = (4 * num_params / (world if sharded else 1) for sharded in SHARDED[strategy])
    return weights + grads + 2 * states


def planner_estimate(recipe, plan) -> int | None:
    """Per-device bytes the planner predicts, or None while launcher/planning/memory.py (issue 3) is not on this branch.

    The one place this benchmark reads the planner: adapt the call here if its API differs.
    """
    if importlib.util.find_spec("launcher.planning.memory") is None:
        return None
    from launcher.planning import memory

    dist = recipe.distributed
    choice = memory.Choice(dist.strategy, dist.offload, dist.offload_parameters)
    return memory.estimate(
        memory.model_shape(recipe),
        recipe,
        choice,
        num_nodes=plan.num_nodes,
        gpus_per_node=plan.procs_per_node,
        micro_batch=plan.micro_batch_size,
    ).per_gpu


def plan_for(recipe_path, procs: int):
    """The plan `launch` would make, or the plan's refusal as text. Asked before a run and of a finished one
    (the load table): its resume: never would refuse the output_dir it filled (two runs would mix there), so
    the plan is the one of resuming it, the same plan."""
    from launcher.config.loading import load_recipe
    from launcher.errors import RecipeError
    from launcher.planning.checks import check_recipe
    from launcher.planning.plan import make_plan

    try:
        recipe = load_recipe(recipe_path, ["train.resume=auto"])
        summary = check_recipe(recipe)
        return recipe, make_plan(
            recipe,
            num_train_samples=summary.counts["train"],
            procs_per_node=procs,
            device="cuda" if ranks(1)[1] else "cpu",
        )
    except RecipeError as exc:
        return None, str(exc).splitlines()[-1].strip()


def load_rows(strategy: str, recipe, plan, memory: dict, whole: int) -> tuple[list[list], dict]:
    """Rows of the load table for one run: each rank, then the node, measured against the planner."""
    from launcher.planning import memory as planner
    from launcher.planning.host_memory import host_load_bytes, host_load_per_rank

    shape = planner.model_shape(recipe)
    first, other = host_load_per_rank(shape, recipe, strategy, plan.world_size, plan.device)
    node = host_load_bytes(shape, recipe, strategy, plan.world_size, plan.procs_per_node, plan.device)
    before = memory["host_before_load_bytes_per_rank"]
    grown = [peak - start for peak, start in zip(memory["host_peak_after_load_bytes_per_rank"], before)]
    # the high-water mark after loading is the load's own peak only if loading raised it
    raised = [a > b for a, b in zip(memory["host_peak_after_load_bytes_per_rank"],
                                    memory["host_peak_before_load_bytes_per_rank"])]  # fmt: skip
    rows = []
    for rank, measured in enumerate(grown):
        planned = first if rank == 0 else other
        note = "" if raised[rank] else " (peak set before loading)"
        rows.append([strategy, f"rank {rank}{note}", measured / MIB, planned / MIB, ratio(measured, planned),
                     measured / whole])  # fmt: skip
    rows.append(
        [strategy, "node (all ranks)", sum(grown) / MIB, node / MIB, ratio(sum(grown), node), sum(grown) / whole]
    )
    raw = {"growth_bytes_per_rank": grown, "planner_per_rank": [first, other], "planner_node": node,
           "load_raised_peak": raised, "memory": memory}  # fmt: skip
    return rows, raw


def measure_loading(work, procs: int, env: dict, runs: dict | None) -> tuple[list[list], dict, int]:
    """The load table: new ddp and fsdp runs of the 134M model, or (smoke) the given {strategy: run folder}."""
    size = MODEL_SMOKE if runs is not None else MODEL_LOAD
    whole = 4 * size.num_params()  # fp32 weights
    rows, raw = [], {}
    for strategy in LOAD_STRATEGIES:
        if runs is not None:
            recipe_path, out_dir = runs[strategy]
        else:
            folder = work / "load"
            out_dir = folder / f"out-{strategy}"
            recipe_path = causal_lm_recipe(
                folder / f"{strategy}.yaml",
                model=llama_folder(folder, size, SEQ_LEN),
                train=fixed_length_lm_data(folder, BATCH, SEQ_LEN, size.vocab),
                output_dir=out_dir,
                seq_len=SEQ_LEN,
                batch_size=BATCH,
                max_steps=1,
                strategy=strategy,
            )
            shutil.rmtree(out_dir, ignore_errors=True)
            run(launch_cmd(recipe_path, "--procs", str(procs)), env, 1800)
        recipe, plan = plan_for(recipe_path, procs)
        memory = json.loads((out_dir / "summary.json").read_text())["memory"]
        more, raw[strategy] = load_rows(strategy, recipe, plan, memory, whole)
        rows += more
    return rows, raw, whole


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], **FULL).parse_args(argv)
    size = sizes(args, FULL, SMOKE)
    model_size = MODEL_SMOKE if args.smoke else MODEL_FULL
    work = work_dir(args, "memory")
    procs, gpus = ranks(size["procs"])
    model = llama_folder(work, model_size, SEQ_LEN)
    num_params = model_size.num_params()
    data = fixed_length_lm_data(work, size["steps"] * BATCH, SEQ_LEN, model_size.vocab)
    env = bench_env(None if gpus else threads_per_rank(procs))
    rows, raw, refusals, runs = [], {}, [], {}
    for strategy in STRATEGIES:
        out_dir = work / f"out-{strategy}"
        recipe_path = causal_lm_recipe(
            work / f"{strategy}.yaml",
            model=model,
            train=data,
            output_dir=out_dir,
            seq_len=SEQ_LEN,
            batch_size=BATCH,
            max_steps=size["steps"],
            strategy=strategy,
        )
        reference = reference_model_states(num_params, strategy, procs)
        recipe, plan = plan_for(recipe_path, procs)
        if recipe is None:
            rows.append([strategy, "refused by the plan", None, None, reference / MIB, None, None, None])
            refusals.append(f"{strategy}: {plan}")
            raw[strategy] = {"refused": plan, "reference_bytes": reference}
            continue
        estimate = planner_estimate(recipe, plan)
        runs[strategy] = (recipe_path, out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        run(launch_cmd(recipe_path, "--procs", str(procs)), env, 900)
        memory = json.loads((out_dir / "summary.json").read_text())["memory"]
        grown = [p - s for p, s in zip(memory["peak_bytes_per_rank"], memory["before_model_bytes_per_rank"])]
        worst = max(grown)
        rows.append(
            [
                strategy,
                "ran",
                worst / MIB,
                memory["peak_bytes_per_rank"][0] / MIB,
                reference / MIB,
                None if estimate is None else estimate / MIB,
                ratio(worst, estimate),
                ratio(worst, reference),
            ]
        )
        raw[strategy] = {
            "memory": memory,
            "growth_bytes_per_rank": grown,
            "planner_estimate_bytes": estimate,
            "reference_bytes": reference,
        }
    device = "CUDA bytes allocated" if gpus else "resident set (RSS)"
    print_table(
        f"memory per rank (MiB): {num_params / 1e6:.1f}M-parameter Llama, {procs} ranks, fp32 AdamW",
        [
            "strategy",
            "status",
            "measured growth (max rank)",
            "peak rank 0",
            "model states (formula)",
            "planner estimate",
            "measured ÷ planner",
            "measured ÷ formula",
        ],
        rows,
        [
            f"measured = {device} peak after training − before model load; "
            "formula = 16 B/param (fp32 weights 4 + grads 4 + Adam 8) divided by the ranks each stage "
            "shards over.",
            "planner estimate: "
            + (
                "launcher.planning.memory"
                if importlib.util.find_spec("launcher.planning.memory")
                else "– (launcher/planning/memory.py from issue 3 is not on this branch)"
            ),
            *refusals,
        ],
    )
    load, load_raw, whole = measure_loading(work, procs, env, runs if args.smoke else None)
    print_table(
        f"loading the weights, host memory per rank (MiB): {whole / 4 / 1e6:.0f}M-parameter Llama "
        f"({whole / MIB:.0f} MiB in fp32), {procs} ranks",
        ["strategy", "rank", "measured load peak", "planner", "measured ÷ planner", "measured ÷ full weights"],
        load,
        [
            "measured = host resident-set high-water mark once the engine holds the model − resident set before "
            "loading (summary.json memory host_*); planner = planning/host_memory.py host_load_per_rank / "
            "host_load_bytes for this device.",
            "fsdp: rank 0 reads the weights, the other ranks build the model on the meta device and receive "
            "their shards (train/engines/fsdp_loading.py).",
        ],
    )
    save_result(
        work,
        {
            "model": model_size.__dict__,
            "num_params": num_params,
            "procs": procs,
            "strategies": raw,
            "load": {"full_weights_bytes": whole, "strategies": load_raw},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
