"""Data at scale: 1M generated SFT rows through `launch`, beside `datasets` on the same rows, in the same run.

Rows: a prompt of 10–60 words and a response of Pareto-distributed length (α 1.2, from 20 words, at most
2,000), words of a 2,000-word vocabulary with a word-level fast tokenizer (one word, one token), max_length
512, a tiny Llama, 2 CPU ranks. Every measured command is a subprocess of its own; its peak resident memory
is the kernel's figure for it (os.wait4's ru_maxrss).

  front end            `launch RECIPE --dry-run` on a cold cache: reads and checks every row
  cold prepare         `launch prepare RECIPE` into an empty cache  vs  load_dataset("json") + batched map
                       (num_proc 2, the same SFT masking) + save_to_disk into an empty cache_dir
  cached               `launch prepare` again (its front end finds the files unchanged and the entries ready)
                       vs load_from_disk + 1,000 random rows; and what 1M rows add to a rank's data set-up
  per rank             resident memory before the model, 1M rows against 1,000 rows of the same recipe
  time to first step   `launch` on the prepared cache  vs  torchrun of a minimal script that opens the same
                       arrow files, loads the model, takes one step

    python -m bench.data              # 1,000,000 rows (about 25 minutes on 2 idle cores, 12 GB of disk)
    python -m bench.data --rows 200000 --rounds 3   # the cold comparison interleaved 3 times (medians)
    python -m bench.data --smoke      # 3,000 rows
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import (
    REPO,
    BenchFailed,
    LlamaSize,
    arguments,
    bench_env,
    launch_cmd,
    llama_folder,
    median,
    print_table,
    ratio,
    save_result,
    sizes,
    threads_per_rank,
    torchrun_cmd,
    words,
    work_dir,
)

FULL = {"rows": 1_000_000, "procs": 2, "max_length": 512, "rounds": 1}
SMOKE = {"rows": 3_000, "procs": 1, "max_length": 64, "rounds": 1}
SMALL_ROWS = 1_000  # the same recipe on this many rows: what a rank holds without the data
MODEL = LlamaSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=2000)
MIB = 2**20


def make_sft(path: Path, num_rows: int, vocab: list[str]) -> Path:
    if path.exists():
        return path
    rng = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for _ in range(num_rows):
            prompt = " ".join(rng.choices(vocab, k=rng.randint(10, 60)))
            response = " ".join(rng.choices(vocab, k=min(int(20 * rng.paretovariate(1.2)), 2000)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    tmp.rename(path)
    return path


def measured(cmd: list[str], env: dict, timeout: float = 3600) -> dict:
    """Run to completion: wall seconds, CPU seconds (user + system of the command and every process it waited
    for, from the kernel: on a busy machine the wall clock measures the neighbours too) and, for a
    `python -m MODULE` command, the peak resident memory of its main process (bench.baselines.peak)."""
    work = Path(env["LAUNCHER_CACHE_DIR"]).parent
    peak_file, log = work / "peak.json", work / "command.log"
    if cmd[:2] == [sys.executable, "-m"]:
        cmd = [sys.executable, "-m", "bench.baselines.peak", str(peak_file), *cmd[2:]]
    peak_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log.read_text().strip().splitlines()[-30:])
        raise BenchFailed(f"{' '.join(map(str, cmd))} exited {os.waitstatus_to_exitcode(status)}:\n{tail}")
    peak = json.loads(peak_file.read_text())["peak_rss_bytes"] if peak_file.exists() else None
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": peak}


def recipe_file(path: Path, model: Path, train: Path, out: Path, size: dict) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(model)},
                "task": {"type": "causal_lm"},
                "data": {
                    "train": str(train),
                    "prompt_field": "prompt",
                    "response_field": "response",
                    "max_length": size["max_length"],
                    "split": {"validation": 0.0, "test": 0.0},
                    "num_proc": 2,
                },
                "train": {"batch_size": 8, "max_steps": 1, "eval_every": None, "resume": "never"},
                "output_dir": str(out),
            },
            sort_keys=False,
        )
    )
    return path


def datasets_cmd(mode: str, data: Path, model: Path, size: dict, work: Path) -> list[str]:
    args = [mode, data, model, size["max_length"], 2, work / "ds-out", work / "ds-cache", work / f"ds-{mode}.json"]
    return [sys.executable, "-m", "bench.baselines.datasets_prepare", *map(str, args)]


def train_entry(cache: Path) -> Path:
    found = [p.parent for p in (cache / "tokenized").glob("*/manifest.json")]
    return max(found, key=lambda folder: json.loads((folder / "manifest.json").read_text())["rows"])


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], **FULL).parse_args(argv)
    size = sizes(args, FULL, SMOKE)
    work = work_dir(args, "data")
    work.mkdir(parents=True, exist_ok=True)
    rows, procs = size["rows"], size["procs"]
    model = llama_folder(work, MODEL, size["max_length"])
    t = time.perf_counter()
    data = make_sft(work / f"sft-{rows}.jsonl", rows, words(MODEL.vocab))
    small = work / f"sft-{SMALL_ROWS}.jsonl"
    if not small.exists():
        with open(data) as src, open(small, "w") as dst:
            dst.writelines(line for _, line in zip(range(SMALL_ROWS), src))
    made = f"data: {rows:,} rows, {data.stat().st_size / MIB:,.0f} MiB ({time.perf_counter() - t:.0f} s)"
    print(made, file=sys.stderr)
    cache = work / "cache"
    for folder in (cache, work / "ds-cache", work / "ds-out", work / "out"):
        shutil.rmtree(folder, ignore_errors=True)
    env = bench_env(threads_per_rank(procs), LAUNCHER_CACHE_DIR=str(cache))
    recipe = recipe_file(work / "recipe.yaml", model, data, work / "out", size)
    small_recipe = recipe_file(work / "recipe-small.yaml", model, small, work / "out-small", size)
    runs: dict[str, dict] = {}

    def step(name: str, cmd: list[str], run_env: dict = env) -> dict:
        run = measured(cmd, run_env)
        rounds.setdefault(name, []).append(run)
        runs[name] = {key: median([r[key] or 0 for r in rounds[name]]) for key in run}
        peak = (run["peak_rss_bytes"] or 0) / MIB
        print(f"{name}: {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU, peak {peak:,.0f} MiB", file=sys.stderr)
        return run

    rounds: dict[str, list[dict]] = {}
    step("front end (--dry-run)", launch_cmd(recipe, "--procs", str(procs), "--dry-run"))
    manifests, ds_colds = [], []
    for _ in range(size["rounds"]):  # cold against cold, interleaved: both see the same neighbours
        for folder in (cache / "tokenized", work / "ds-cache", work / "ds-out"):
            shutil.rmtree(folder, ignore_errors=True)  # the prepare's front end reads the files again too
        step("launch prepare, cold", [sys.executable, "-m", "launcher.cli", "prepare", str(recipe)])
        manifests.append(json.loads((train_entry(cache) / "manifest.json").read_text()))
        step("datasets: load_dataset + map + save, cold", datasets_cmd("cold", data, model, size, work))
        ds_colds.append(json.loads((work / "ds-cold.json").read_text()))
    manifest = {key: median([m[key] for m in manifests]) for key in ("read_s", "tokenize_s")} | {
        "num_proc": manifests[0]["num_proc"], "rows": manifests[0]["rows"]}  # fmt: skip
    ds_cold = {key: median([d[key] for d in ds_colds]) for key in ds_colds[0]}
    step("launch prepare, cached", [sys.executable, "-m", "launcher.cli", "prepare", str(recipe)])
    step("datasets: load_from_disk + 1,000 rows", datasets_cmd("cached", data, model, size, work))
    ds_cached = json.loads((work / "ds-cached.json").read_text())
    step("launch, 1 step on the prepared cache", launch_cmd(recipe, "--procs", str(procs)))
    big = json.loads((work / "out" / "summary.json").read_text())
    step("launch, 1 step, 1,000 rows", launch_cmd(small_recipe, "--procs", str(procs)))
    few = json.loads((work / "out-small" / "summary.json").read_text())
    baseline = work / "torchrun.json"
    step(
        "torchrun: open the same arrow cache, 1 step",
        torchrun_cmd(
            procs, "bench.baselines.minimal_torchrun", model, size["max_length"], baseline, train_entry(cache)
        ),
        {**env, "BENCH_T0": repr(time.time())},
    )
    minimal = json.loads(baseline.read_text())

    cold, cold_cpu = runs["launch prepare, cold"]["wall_s"], runs["launch prepare, cold"]["cpu_s"]
    ds = runs["datasets: load_dataset + map + save, cold"]["wall_s"]
    ds_cpu = runs["datasets: load_dataset + map + save, cold"]["cpu_s"]
    per_rank_big = big["memory"]["before_model_bytes_per_rank"]
    per_rank_few = few["memory"]["before_model_bytes_per_rank"]
    added = [(b - f) / MIB for b, f in zip(per_rank_big, per_rank_few)]
    open_added = big["timings"]["data_prep_s"] - few["timings"]["data_prep_s"]
    first, first_minimal = big["timings"]["time_to_first_step_s"], minimal["time_to_first_step_s"]
    table = [
        ["front end: wall s", runs["front end (--dry-run)"]["wall_s"], None, None, "≤ 20"],
        ["front end: CPU s", runs["front end (--dry-run)"]["cpu_s"], None, None, None],
        ["front end: peak MiB", (runs["front end (--dry-run)"]["peak_rss_bytes"] or 0) / MIB, None, None, "≤ 300"],
        ["cold prepare: peak MiB of the main process", (runs["launch prepare, cold"]["peak_rss_bytes"] or 0) / MIB,
         (runs["datasets: load_dataset + map + save, cold"]["peak_rss_bytes"] or 0) / MIB, None, None],
        ["cold prepare: wall s (launch prepare vs datasets)", cold, ds, ratio(ds, cold), "speed ≥ 0.9"],
        ["cold prepare: CPU s, all processes", cold_cpu, ds_cpu, ratio(ds_cpu, cold_cpu), None],
        ["  of which reading + checking (arrow written) s", manifest["read_s"], ds_cold["load_s"], None, None],
        ["  of which tokenizing s", manifest["tokenize_s"], ds_cold["map_s"] + ds_cold["save_s"], None, None],
        ["cold prepare: rows/s", rows / cold, rows / ds, None, None],
        ["cached: launch prepare vs load_from_disk + 1k rows, s", runs["launch prepare, cached"]["wall_s"],
         runs["datasets: load_from_disk + 1,000 rows"]["wall_s"], None, None],
        ["  datasets' in-process part (imports excluded), s", None, ds_cached["total_s"], None, None],
        [f"cached: rank data set-up, {rows:,} rows minus {SMALL_ROWS:,}, s", open_added, None, None, "≤ 1 per 1M"],
        [f"per rank: RSS before the model, {rows:,} rows minus {SMALL_ROWS:,}, MiB", max(added), None, None, "≤ 200"],
        ["time to first step (launch vs torchrun opening the cache)", first, first_minimal,
         ratio(first, first_minimal), "≤ 1.2"],
        ["  launch's front end in it, s", big["timings"]["recipe_and_plan_s"], None, None, None],
        ["  launch's pre-flight checks in it, s", big["timings"]["preflight_s"], None, None, None],
        ["  launch's data set-up on a rank (tokenizer, open, sampler), s", big["timings"]["data_prep_s"],
         minimal["data_prep_s"], None, None],
        ["time to first step without the pre-flight checks", first - big["timings"]["preflight_s"], first_minimal,
         ratio(first - big["timings"]["preflight_s"], first_minimal), "≤ 1.2"],
    ]  # fmt: skip
    print_table(
        f"data: {rows:,} SFT rows, max_length {size['max_length']}, {procs} ranks",
        ["measure", "launch", "baseline", "ratio", "goal"],
        table,
        [
            "ratio: cold prepare = datasets wall ÷ launch wall (speed); time to first step = launch ÷ torchrun. "
            "Peak MiB: VmHWM of the command's main process (tokenizing workers not included, on either side).",
            f"launch cold prepare: {manifest['num_proc']} tokenizing processes; ranks before the model (MiB): "
            f"{[round(b / MIB) for b in per_rank_big]} with {rows:,} rows, "
            f"{[round(f / MIB) for f in per_rank_few]} with {SMALL_ROWS:,}",
        ],
    )
    save_result(
        work,
        {"size": size, "runs": runs, "rounds": rounds, "manifest": manifest, "datasets_cold": ds_cold,
         "datasets_cached": ds_cached, "launch_timings": big["timings"],
         "launch_small_timings": few["timings"], "memory": {"big": per_rank_big, "small": per_rank_few},
         "torchrun_cache": minimal},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
