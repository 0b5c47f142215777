"""Tokenization (cached by content hash), rank sharding and batching.

The sampler is stateless: the rows of optimizer step s are a function of
(seed, epoch, s) alone, so a checkpoint only needs the step to resume at the
exact next batch, and the global batch is identical at any world size.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from launcher.config.recipe import Recipe
from launcher.planning.data_files import Splits
from launcher.planning.plan import Plan

IGNORE = -100
CACHE_VERSION = "1"
TOKEN_LEVEL = {"token_classification", "causal_lm", "seq2seq"}


def cache_root() -> Path:
    return Path(os.environ.get("LAUNCHER_CACHE_DIR", Path.home() / ".cache" / "launcher")) / "tokenized"


def _tokenizer_fingerprint(tokenizer) -> str:
    folder = Path(tokenizer.name_or_path)
    digest = hashlib.sha256(tokenizer.name_or_path.encode())
    if folder.is_dir():
        for file in sorted(folder.glob("*")):
            if file.is_file() and (
                "token" in file.name or file.name.startswith(("vocab", "merges", "spiece", "special"))
            ):
                digest.update(file.read_bytes())
    digest.update(json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(recipe: Recipe, splits: Splits, tokenizer) -> str:
    digest = hashlib.sha256(CACHE_VERSION.encode())
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    settings = {"task": recipe.task.type, "max_length": recipe.data.max_length, "chat": recipe.task.chat_template}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, rows in splits.items():
        digest.update(name.encode())
        digest.update(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:24]


class Tokenize:
    """One row → model inputs, `labels`, and `weight` (how many loss terms it contributes)."""

    def __init__(self, recipe: Recipe, tokenizer):
        self.task = recipe.task.type
        self.chat = recipe.task.chat_template
        self.max_length = recipe.data.max_length
        self.tok = tokenizer

    def __call__(self, row: dict) -> dict:
        handler = {
            "token_classification": self._tokens,
            "causal_lm": self._causal,
            "seq2seq": self._seq2seq,
        }.get(self.task, self._sequence)
        return handler(row)

    def _sequence(self, row):
        enc = self.tok(row["text"], row.get("text_pair"), truncation=True, max_length=self.max_length)
        return {**dict(enc), "labels": row["label"], "weight": 1}

    def _tokens(self, row):
        enc = self.tok(row["text"], is_split_into_words=True, truncation=True, max_length=self.max_length)
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(IGNORE if word is None or word == previous else row["label"][word])
            previous = word
        return {**dict(enc), "labels": labels, "weight": sum(1 for x in labels if x != IGNORE)}

    def _causal(self, row):
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        if "prompt" not in row:
            ids = self.tok(row["text"], add_special_tokens=True)["input_ids"] + eos
            ids = ids[: self.max_length]
            labels = list(ids)
        else:
            if self.chat:
                user = [{"role": "user", "content": row["prompt"]}]
                prompt = list(
                    self.tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
                )
                full = list(
                    self.tok.apply_chat_template(
                        user + [{"role": "assistant", "content": row["response"]}], tokenize=True, return_dict=False
                    )
                )
                if full[: len(prompt)] != prompt:  # templates that re-render the prompt differently
                    full = prompt + self.tok(row["response"], add_special_tokens=False)["input_ids"] + eos
            else:
                prompt = self.tok(row["prompt"], add_special_tokens=True)["input_ids"]
                full = prompt + self.tok(row["response"], add_special_tokens=False)["input_ids"] + eos
            ids = full[: self.max_length]
            labels = [IGNORE] * min(len(prompt), len(ids)) + ids[len(prompt) :]
        weight = sum(1 for x in labels[1:] if x != IGNORE)  # next-token targets
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "weight": weight}

    def _seq2seq(self, row):
        enc = self.tok(row["prompt"], truncation=True, max_length=self.max_length)
        target = self.tok(text_target=row["response"], truncation=True, max_length=self.max_length)["input_ids"]
        return {**dict(enc), "labels": target, "weight": len(target)}


def prepare(recipe: Recipe, splits: Splits, tokenizer) -> dict[str, list[dict]]:
    """Tokenized splits from the cache, tokenizing once under a file lock if absent.

    Any number of ranks (or nodes sharing a file system) may call this at once:
    the first takes the lock and tokenizes, the others wait on the lock file and
    then read the result. No collective is involved, so a slow tokenizer never
    trips a collective timeout.
    """
    import datasets

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(recipe, splits, tokenizer)
    folder = root / key
    with FileLock(str(root / f"{key}.lock")):
        if not (folder / "COMPLETE").exists():
            tmp = root / f".{key}.tmp-{os.getpid()}"
            fn = Tokenize(recipe, tokenizer)
            for name, rows in splits.items():
                encoded = [fn(row) for row in rows]
                datasets.Dataset.from_list(encoded or [{"weight": 0}]).save_to_disk(str(tmp / name))
            (tmp / "COMPLETE").write_text(key)
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            os.replace(tmp, folder)
    # Rows as Python lists: batches are then plain indexing, with no per-step arrow calls.
    return {
        name: datasets.load_from_disk(str(folder / name)).to_list() if rows else [] for name, rows in splits.items()
    }


@dataclass
class StepBatch:
    micro_batches: list[list[int]]  # this rank's row indices, one list per accumulation step
    global_weight: float  # loss terms in the whole global batch, identical on every rank


class Sampler:
    """Which rows each rank trains on at each optimizer step.

    Stateless by design: an epoch's order is a function of (seed, epoch), so the
    step number alone pins the data position and every rank computes the whole
    global batch (and its number of loss terms) without communicating.
    `row_probs` (data.balance) draws each epoch with replacement, rare classes
    as often as common ones.
    """

    def __init__(self, plan: Plan, seed: int, weights: np.ndarray, row_probs: np.ndarray | None = None):
        self.plan, self.seed, self.weights, self.row_probs = plan, seed, weights, row_probs
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = self.plan.num_train_samples
            self._order = rng.permutation(n) if self.row_probs is None else rng.choice(n, n, p=self.row_probs)
            self._epoch = epoch
        return self._order

    def batch(self, step: int, rank: int) -> StepBatch:
        """The rows of rank `rank` at optimizer step `step` (0-based, global)."""
        plan = self.plan
        epoch, within = divmod(step, plan.steps_per_epoch)
        rows = self.order(epoch)[within * plan.global_batch_size : (within + 1) * plan.global_batch_size]
        micro, world = plan.micro_batch_size, plan.world_size
        chunks = [
            rows[(a * world + rank) * micro : (a * world + rank + 1) * micro].tolist() for a in range(plan.grad_accum)
        ]
        return StepBatch(chunks, float(self.weights[rows].sum()))


def balanced_row_probs(labels: list[int]) -> np.ndarray:
    """Each class gets the same total probability, shared evenly among its rows."""
    labels_arr = np.asarray(labels)
    counts = np.bincount(labels_arr)
    probs = 1.0 / counts[labels_arr]
    return probs / probs.sum()


class Collate:
    def __init__(self, tokenizer, task: str):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.task = task

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in rows[0]:
                fill = self.pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
        if self.task in TOKEN_LEVEL:
            label_width = max(len(r["labels"]) for r in rows)
            batch["labels"] = torch.tensor([r["labels"] + [IGNORE] * (label_width - len(r["labels"])) for r in rows])
        elif self.task == "sequence_classification":
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        else:
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float32)
        return batch


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
