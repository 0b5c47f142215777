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
from launcher.train.tasks import TaskHooks, hooks

CACHE_VERSION = "1"


class DataMismatch(RuntimeError):
    """The ranks read other rows than the launcher planned with (the files changed since, or checks the launcher
    could not run dropped some)."""


def check_planned_rows(splits: Splits, plan: Plan) -> None:
    """The plan's batch arithmetic and the sampler's permutation hold only for the rows it counted."""
    planned = (plan.num_train_samples, plan.num_validation_samples, plan.num_test_samples)
    found = tuple(len(rows) for _, rows in splits.items())
    if found != planned:
        raise DataMismatch(
            f"the ranks read {found[0]} / {found[1]} / {found[2]} train / validation / test rows where the launch "
            f"planned {planned[0]} / {planned[1]} / {planned[2]}: the data files changed since, or the row checks "
            f"the launcher could not run ({'; '.join(splits.notes) or 'none'}) dropped some; launch again"
        )


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
    if recipe.task.spec.renders_chats:  # what a conversation's rendering depends on besides the tokenizer's files
        from launcher.planning.conversations import recipe_template

        settings.update(
            train_on=recipe.task.train_on,
            end_of_turn=recipe.task.end_of_turn,
            template=recipe_template(recipe) or getattr(tokenizer, "chat_template", None),
        )
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, rows in splits.items():
        digest.update(name.encode())
        digest.update(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:24]


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
            fn = hooks(recipe, tokenizer).tokenize
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
    """Rows → a padded batch: model inputs padded to the longest row, labels as the task collates them."""

    def __init__(self, task: TaskHooks):
        tokenizer = task.tok
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.task = task

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self.task.collate(rows, self.pad)

    def pad(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Model inputs padded to the longest row, and the labels as the task collates them."""
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in rows[0]:
                fill = self.pad_id if key == "input_ids" else 0
                batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
        batch["labels"] = self.task.collate_labels(rows)
        return batch


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
