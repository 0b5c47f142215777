"""Baseline for data preparation: what a Trainer user writes with `datasets` for prompt/response SFT.

cold:   load_dataset("json") (into an empty cache_dir) + batched map with a fast tokenizer (num_proc N), the
        prompt masked out of the labels as launch's causal_lm does it, + save_to_disk
cached: load_from_disk (memory-mapped) + 1,000 random rows read
Run: python -m bench.baselines.datasets_prepare cold|cached DATA TOKENIZER MAX_LENGTH NUM_PROC OUT CACHE RESULT
"""

from __future__ import annotations

import json
import random
import sys
import time

t_main = time.time()


def sft(tokenizer, max_length: int):
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(batch: dict) -> dict:
        prompts = tokenizer(batch["prompt"])["input_ids"]
        responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, response in zip(prompts, responses):
            ids = (prompt + response + eos)[:max_length]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([-100] * min(len(prompt), len(ids)) + ids[len(prompt) :])
        return out

    return encode


def main(mode: str, data: str, tokenizer_path: str, max_length: str, num_proc: str, out: str, cache: str, result: str):
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    t0 = time.time()
    if mode == "cold":
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
        t_loaded = time.time()
        encode = sft(tokenizer, int(max_length))
        ds = ds.map(encode, batched=True, num_proc=int(num_proc), remove_columns=ds.column_names)
        t_mapped = time.time()
        ds.save_to_disk(out)
        parts = {"load_s": t_loaded - t0, "map_s": t_mapped - t_loaded, "save_s": time.time() - t_mapped}
    else:
        ds = datasets.load_from_disk(out)
        rng = random.Random(0)
        rows = [ds[rng.randrange(len(ds))] for _ in range(1000)]
        assert all(r["input_ids"] for r in rows)
        parts = {"rows": len(ds)}
    done = time.time()
    with open(result, "w") as f:
        json.dump({"total_s": done - t0, "imports_s": t0 - t_main, **parts}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
