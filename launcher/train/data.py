"""The tokenized data on a rank: memory-mapped arrow splits, the stateless sampler, batching.

A rank never reads the sources: it opens the cache entries the plan names (written before the ranks started,
launcher/train/cache.py) as memory-mapped arrow tables, and a split is a view over them (`SplitView`): rows
are read when a batch asks for them, so a rank's resident memory grows by the few columns the sampler needs
(weights, lengths, labels for data.balance), not by the tokenized size.

The sampler is stateless: the rows of optimizer step s are a function of (seed, epoch, s) alone, so a
checkpoint only needs the step to resume at the exact next batch, and the global batch is identical at any
world size. A weighted mixture of sources (launcher.planning.mixture) is part of that function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from launcher.config.recipe import Recipe
from launcher.planning.data_cache import DataPlan, SourcePlan, cache_root, manifest
from launcher.planning.mixture import epoch_order, samples_per_epoch
from launcher.planning.plan import Plan
from launcher.train.cache import load_table, prepare_cache, token_lengths
from launcher.train.tasks import TaskHooks


class SplitView:
    """Rows of a split, read lazily from memory-mapped arrow: parts (an entry's table and the indices of its rows
    in this split) laid end to end. `view[i]` is one row as a dict of Python values; `view[a:b:c]` a view."""

    def __init__(self, parts: list[tuple], select: np.ndarray | None = None):
        self.parts = parts
        sizes = [len(idx) if idx is not None else table.num_rows for table, idx in parts]
        self.offsets = np.cumsum([0, *sizes])
        self.select = select

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.select is None else len(self.select)

    def __getitem__(self, key):
        if isinstance(key, slice):
            positions = np.arange(len(self))[key] if self.select is None else self.select[key]
            return SplitView(self.parts, positions)
        return self.rows([key])[0]

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), 256):
            yield from self.rows(range(start, min(start + 256, len(self))))

    def _locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(part, row within the part's table) of split positions."""
        positions = np.asarray(indices, dtype=np.int64)
        if self.select is not None:
            positions = self.select[positions]
        part = np.searchsorted(self.offsets, positions, side="right") - 1
        local = positions - self.offsets[part]
        for p, (_, idx) in enumerate(self.parts):
            if idx is not None:
                mine = part == p
                local[mine] = idx[local[mine]]
        return part, local

    def rows(self, indices) -> list[dict]:
        """The rows at these positions, in order (one arrow `take` per part)."""
        part, local = self._locate(indices)
        out: list[dict | None] = [None] * len(part)
        for p in np.unique(part):
            where = np.nonzero(part == p)[0]
            taken = self.parts[p][0].take(local[where]).to_pylist()
            for i, row in zip(where, taken):
                out[i] = row
        return out  # type: ignore[return-value]

    def _gather(self, values_of: Callable) -> np.ndarray:
        """A per-row array over the split: `values_of(table)` per part, taken at the part's rows."""
        if self.select is None:  # the parts end to end: no position arithmetic over the whole split
            chunks = [values_of(table) if idx is None else values_of(table)[idx] for table, idx in self.parts]
            return np.concatenate(chunks) if chunks else np.empty(0)
        part, local = self._locate(np.arange(len(self)))
        out = None
        for p, (table, _) in enumerate(self.parts):
            values, mine = values_of(table), part == p
            if out is None:
                out = np.empty(len(self), dtype=values.dtype)
            out[mine] = values[local[mine]]
        return out if out is not None else np.empty(0)

    def column(self, name: str) -> np.ndarray:
        """One scalar column over the split (weight, labels), as numpy."""
        return self._gather(lambda table: table.column(name).to_numpy(zero_copy_only=False))

    def lengths(self) -> np.ndarray:
        """Tokens of each row (train.cache.token_lengths), from the arrow offsets: no row is read."""
        return self._gather(token_lengths)


class TokenizedData:
    """The splits of a run (`data["train"]`, `data.validation`...) and what the manifests say about them."""

    def __init__(self, splits: dict[str, SplitView], facts: dict[str, list[dict]]):
        self.splits, self.facts = splits, facts

    def __getitem__(self, split: str) -> SplitView:
        return self.splits[split]

    train = property(lambda self: self.splits["train"])
    validation = property(lambda self: self.splits["validation"])
    test = property(lambda self: self.splits["test"])

    def label_counts(self, num_labels: int) -> list[int]:
        """Training rows per class (class and tag labels), as counted when the cache was written."""
        counts = [0] * num_labels
        for part in self.facts["train"]:
            for i, n in enumerate(part.get("label_counts") or []):
                counts[i] += n
        return counts

    def source_rows(self) -> list[int]:
        return [part["rows"] for part in self.facts["train"]]

    def source_tokens(self) -> list[int]:
        return [part["tokens"] for part in self.facts["train"]]


def _entry(root: Path, entry: SourcePlan, recipe: Recipe, data_plan: DataPlan, say) -> tuple[Path, dict]:
    """An entry's folder and manifest; prepared here (under its lock) if the launcher could not."""
    folder = root / entry.key
    found = manifest(folder)
    if found is None:
        say(f"{entry.split} {entry.label} is not in the cache {root}: tokenizing it here (use `launch prepare`)")
        prepare_cache(recipe, data_plan.model_copy(update={"sources": [entry]}), say=say)
        found = manifest(folder)
    return folder, found


def open_data(recipe: Recipe, data_plan: DataPlan, say: Callable[[str], None] = print) -> TokenizedData:
    """The run's splits from the cache entries of the plan: train from each training source's train part;
    validation and test from their own source, or from what the carve gave each training source."""
    root = cache_root(recipe)  # this machine's: a Ray worker's home may not be the driver's
    parts: dict[str, list] = {"train": [], "validation": [], "test": []}
    facts: dict[str, list] = {"train": [], "validation": [], "test": []}
    for entry in data_plan.sources:
        if not entry.key:
            continue
        folder, found = _entry(root, entry, recipe, data_plan, say)
        table = load_table(folder, found["files"])
        for part, info in found["parts"].items():
            split = entry.split if part == "all" else part
            index = np.load(folder / info["index"], mmap_mode="r") if info["index"] else None
            parts[split].append((table, index))
            facts[split].append(info)
    return TokenizedData({split: SplitView(p) for split, p in parts.items()}, facts)


def open_prepared(recipe: Recipe, tokenizer=None, say: Callable[[str], None] = print) -> TokenizedData:
    """The recipe's splits checked, tokenized into the cache where missing, and opened: what `launch` does before
    and on the ranks, in one process (tools, tests, benchmarks)."""
    from launcher.planning.data_cache import make_data_plan
    from launcher.planning.data_files import check_data

    data_plan = make_data_plan(recipe, check_data(recipe))
    prepare_cache(recipe, data_plan, tokenizer, say=say)
    return open_data(recipe, data_plan, say)


@dataclass
class StepBatch:
    micro_batches: list[list[int]]  # this rank's row indices, one list per accumulation step
    global_weight: float  # loss terms in the whole global batch, identical on every rank


@dataclass
class Mixture:
    """Training sources laid end to end: their rows, and the samples each gives an epoch (mixture.py)."""

    rows: list[int]
    per_epoch: list[int]


class Sampler:
    """Which rows each rank trains on at each optimizer step.

    Stateless by design: an epoch's order is a function of (seed, epoch), so the
    step number alone pins the data position and every rank computes the whole
    global batch (and its number of loss terms) without communicating.
    `row_probs` (data.balance) draws each epoch with replacement, rare classes
    as often as common ones; `mixture` draws each source's share of the epoch.
    """

    def __init__(
        self,
        plan: Plan,
        seed: int,
        weights: np.ndarray,
        row_probs: np.ndarray | None = None,
        mixture: Mixture | None = None,
    ):
        self.plan, self.seed, self.weights, self.row_probs, self.mixture = plan, seed, weights, row_probs, mixture
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = self.plan.num_train_samples
            if self.mixture is not None:
                self._order = epoch_order(self.mixture.rows, self.mixture.per_epoch, self.seed, epoch)
            elif self.row_probs is not None:
                self._order = np.random.default_rng([self.seed, epoch]).choice(n, n, p=self.row_probs)
            else:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
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


def balanced_row_probs(labels) -> np.ndarray:
    """Each class gets the same total probability, shared evenly among its rows."""
    labels_arr = np.asarray(labels)
    counts = np.bincount(labels_arr)
    probs = 1.0 / counts[labels_arr]
    return probs / probs.sum()


def make_sampler(recipe: Recipe, plan: Plan, data: TokenizedData) -> Sampler:
    """The recipe's sampler over the opened data: plain, class-balanced, or a weighted mixture."""
    train = data.train
    weights = train.column("weight").astype(np.float64)
    row_probs = balanced_row_probs(train.column("labels")) if recipe.data.balance else None
    mixture = None
    if recipe.data.weighted:
        rows = data.source_rows()
        source_weights = [s.weight for s in recipe.data.train]
        mixture = Mixture(rows, samples_per_epoch(rows, source_weights, recipe.data.mix_by, data.source_tokens()))
    return Sampler(plan, recipe.data.seed, weights, row_probs, mixture)


class DataMismatch(RuntimeError):
    """The ranks opened other rows than the launcher planned with (the files changed since, or row checks the
    launcher could not run, for want of the tokenizer, dropped some when the cache was written)."""


def check_planned_rows(data: TokenizedData, plan: Plan) -> None:
    """The plan's batch arithmetic and the sampler's permutation hold only for the rows it counted."""
    planned = (plan.num_train_samples, plan.num_validation_samples, plan.num_test_samples)
    found = tuple(len(data[split]) for split in ("train", "validation", "test"))
    if found != planned:
        raise DataMismatch(
            f"the ranks opened {found[0]} / {found[1]} / {found[2]} train / validation / test rows where the launch "
            f"planned {planned[0]} / {planned[1]} / {planned[2]}: the data changed since, or row checks the "
            "launcher could not run dropped some; launch again"
        )


def open_training_data(
    recipe: Recipe, plan: Plan, task: TaskHooks, say: Callable[[str], None], progress: Callable[[], None]
) -> TokenizedData:
    """A rank's data: the cache entries the plan names (a plan without data: checked again here), with
    data.streaming the streamed training split in place of train (its own sampler: train/streaming.py)."""
    data_plan = plan.data
    if data_plan is None:
        from launcher.planning.data_cache import make_data_plan
        from launcher.planning.data_files import check_data

        data_plan = make_data_plan(recipe, check_data(recipe))
    data = open_data(recipe, data_plan, say)
    if recipe.data.streaming:
        from launcher.train.streaming import StreamingTrain

        data.splits["train"] = StreamingTrain(recipe, plan, task, progress)
    check_planned_rows(data, plan)
    return data


class Collate:
    """Rows → a padded batch: model inputs padded to the longest row, labels as the task collates them."""

    def __init__(self, task: TaskHooks):
        tokenizer = task.tok
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.task = task

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        return self.task.collate(list(rows), self.pad)  # a list of rows, or a SplitView of them

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
