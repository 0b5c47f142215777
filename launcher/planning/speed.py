"""The speed settings, checked before launch: attention kernel, torch.compile, the causal-LM loss, packing.

Each one that cannot run where the plan puts it is refused here with what to use instead, instead of failing
on every rank after allocation (or, worse, falling back silently to something slower). Torch-free: packages are
looked up with importlib.util.find_spec, never imported.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from launcher.config.loading import resolve_model_path
from launcher.config.recipe import Recipe
from launcher.errors import Problem, RecipeError

SHARDS_PARAMETERS = ("zero3", "fsdp")
# config.json keys of models that transform the logits after the LM head (Gemma 2/3 soft-capping, Cohere's
# scale): the chunked loss calls the head itself, so it would skip that transformation
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _model_config(recipe: Recipe) -> dict:
    """The local model folder's config.json ({} for a hub id or an unreadable file: the ranks decide then)."""
    try:
        path = Path(resolve_model_path(recipe.model.path)) / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    except (RecipeError, OSError, ValueError):
        return {}


def logit_transform(recipe: Recipe) -> str | None:
    config = _model_config(recipe)
    found = [k for k in LOGIT_TRANSFORMS if config.get(k) not in (None, 1, 1.0)]
    return found[0] if found else None


def lm_loss(recipe: Recipe, strategy: str) -> str:
    """The causal-LM loss the ranks run: 'full', 'chunked' or 'liger' ('auto' resolved; 'full' for other tasks)."""
    chosen = recipe.train.lm_loss
    if not recipe.task.spec.next_token:
        return "full"
    if chosen == "auto":
        return "full" if strategy in SHARDS_PARAMETERS or logit_transform(recipe) else "chunked"
    return chosen


def problems(recipe: Recipe, strategy: str, device: str) -> list[Problem]:
    """Why the recipe's speed settings cannot run with `strategy` on `device` (empty: they can)."""
    found = []
    attn = recipe.model.attn_implementation
    if attn == "flash_attention_2":
        if device != "cuda":
            found.append(
                Problem("model.attn_implementation", "flash_attention_2 needs a CUDA GPU; use sdpa (default) or eager")
            )
        elif not installed("flash_attn"):
            found.append(
                Problem(
                    "model.attn_implementation",
                    "flash_attention_2 needs the flash-attn package, which is not installed "
                    "(pip install flash-attn --no-build-isolation); or use sdpa",
                )
            )
    if recipe.train.compile:
        if device == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            found.append(Problem("train.compile", "torch.compile on CPU (inductor) needs a C++ compiler on PATH"))
        if recipe.model.quantization is not None:
            found.append(Problem("train.compile", "bitsandbytes layers do not compile; turn it off with quantization"))
        if strategy == "zero3":
            found.append(
                Problem(
                    "train.compile",
                    "zero3 gathers parameters in module hooks that break compiled regions; use fsdp or zero2 with "
                    "compile, or train.compile=false",
                )
            )
    chosen = recipe.train.lm_loss
    if recipe.task.spec.next_token and chosen in ("chunked", "liger"):
        if strategy in SHARDS_PARAMETERS:
            found.append(
                Problem(
                    "train.lm_loss",
                    f"{chosen} calls the LM head outside the model's forward, where {strategy} keeps its weight "
                    "sharded; use lm_loss full (or auto) with it, or strategy ddp/zero1/zero2",
                )
            )
        transform = logit_transform(recipe)
        if transform:
            found.append(
                Problem(
                    "train.lm_loss",
                    f"the model transforms its logits after the head ({transform}), which the {chosen} loss would "
                    "skip; use lm_loss full (or auto)",
                )
            )
    if chosen == "liger" and recipe.task.spec.next_token:
        if device != "cuda":
            found.append(Problem("train.lm_loss", "liger is a CUDA (Triton) kernel; use chunked on CPU"))
        elif not installed("liger_kernel"):
            found.append(Problem("train.lm_loss", "liger needs the liger-kernel package (pip install liger-kernel)"))
        if recipe.task.resolved_loss.class_weights:  # cross_entropy: the one loss of causal_lm
            found.append(Problem("train.lm_loss", "liger fuses plain cross-entropy only (no class_weights)"))
    return found
