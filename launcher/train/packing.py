"""Which data rows share a model row, and how such a row is collated: packing and length grouping.

Both compose on the stateless Sampler (launcher.train.data): what a step trains stays a function of
(seed, epoch, step), so resume is exact at any world size.

    data.packing: none           each row is a model row, padded to the micro-batch's longest
                  pack           each bin of max_length tokens (launcher.planning.packing) is a model row;
                                 train.batch_size counts bins
                  padding_free   the rows of a micro-batch are one model row, no padding at all
    data.group_by_length         rows of similar length share a global batch (classification, tagging)

A packed model row restarts `position_ids` at every sequence, and no token attends across a sequence
boundary: with sdpa/eager the collate builds a block-diagonal causal mask [rows, 1, T, T] (what transformers
passes to the kernel as it is); with flash_attention_2 the micro-batch becomes one row whose restarting
position_ids transformers turns into varlen attention (cu_seqlens). The label at the first token of each
sequence is IGNORE, so the last token of one sequence never learns to predict the first of the next: the
trained tokens, and so the loss, are those of the unpacked rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from launcher.config.recipe import Recipe
from launcher.planning.packing import epoch_bins
from launcher.planning.plan import Plan
from launcher.train.data import Collate, Sampler, StepBatch, TokenizedData, balanced_row_probs, make_sampler
from launcher.train.tasks import IGNORE, TaskHooks

GROUP_SPAN = 50  # data.group_by_length sorts runs of 50 global batches by length (transformers' mega-batches)


class LengthGroupedSampler(Sampler):
    """The epoch's shuffle, then each run of GROUP_SPAN global batches sorted by length (longest first) and cut
    into global batches, whose order is shuffled again: a micro-batch holds rows of similar length, and an
    epoch still sees its long rows spread over the whole epoch."""

    def __init__(self, plan: Plan, seed: int, weights: np.ndarray, lengths, row_probs: np.ndarray | None = None):
        super().__init__(plan, seed, weights, row_probs)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._grouped_epoch, self._grouped = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._grouped_epoch:
            shuffled = super().order(epoch)
            size = self.plan.global_batch_size
            span = size * GROUP_SPAN
            runs = [shuffled[i : i + span] for i in range(0, len(shuffled), span)]
            grouped = np.concatenate([run[np.argsort(-self.lengths[run], kind="stable")] for run in runs])
            full = len(grouped) // size
            batches = np.random.default_rng([self.seed, epoch, 2]).permutation(full)
            head = grouped[: full * size].reshape(full, size)[batches].reshape(-1)
            self._grouped, self._grouped_epoch = np.concatenate([head, grouped[full * size :]]), epoch
        return self._grouped


class PackedSampler(Sampler):
    """data.packing: pack. The units of an epoch are its bins (planning.packing.epoch_bins): the epoch shuffles
    bin indices and a bin's weight is its rows' loss terms. `bins` are those of the epoch of the last batch."""

    def __init__(self, plan: Plan, seed: int, row_weights: np.ndarray, lengths, capacity: int):
        super().__init__(plan, seed, np.zeros(0))
        self.row_weights, self.lengths, self.capacity = row_weights, np.asarray(lengths), capacity
        self.bins: list[list[int]] = []
        self._bins_epoch = -1

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._bins_epoch:
            self.bins = epoch_bins(self.lengths, self.capacity, self.seed, epoch)
            if len(self.bins) != self.plan.num_train_bins:  # the plan counted them from the same lengths
                raise RuntimeError(
                    f"epoch {epoch} packs into {len(self.bins)} bins, the plan counted "
                    f"{self.plan.num_train_bins}: the tokenized data changed since planning"
                )
            self.weights = np.array([self.row_weights[b].sum() for b in self.bins], dtype=np.float64)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.bins))
            self._bins_epoch = self._epoch = epoch
        return self._order


@dataclass
class StepRows:
    """One rank's share of an optimizer step: per micro-batch, its model rows, each a list of data rows
    (one row each without packing), and the loss terms of the whole global batch."""

    micro_batches: list[list[list[int]]]
    global_weight: float


class Batches:
    """The data rows of (step, rank), grouped into model rows as data.packing says."""

    def __init__(self, sampler: Sampler, packing: str):
        self.sampler, self.packing = sampler, packing

    def __call__(self, step: int, rank: int) -> StepRows:
        batch: StepBatch = self.sampler.batch(step, rank)
        if isinstance(self.sampler, PackedSampler):
            groups = [[self.sampler.bins[i] for i in micro] for micro in batch.micro_batches]
        elif self.packing == "padding_free":
            groups = [[micro] for micro in batch.micro_batches]
        else:
            groups = [[[i] for i in micro] for micro in batch.micro_batches]
        return StepRows(groups, batch.global_weight)


def make_batches(plan: Plan, recipe: Recipe, data: TokenizedData) -> Batches:
    """The sampler the recipe's data settings ask for (over the opened, memory-mapped splits), wrapped to give
    model rows. Packing and length grouping read only the rows' lengths (arrow offsets) and weights."""
    settings, train = recipe.data, data.train
    if settings.streaming:  # the streamed split is its own sampler (compat refuses pack/group_by_length there)
        return Batches(train, settings.packing)
    if settings.packing != "pack" and not settings.group_by_length:
        return Batches(make_sampler(recipe, plan, data), settings.packing)
    weights, lengths = train.column("weight").astype(np.float64), train.lengths()
    if settings.packing == "pack":
        sampler: Sampler = PackedSampler(plan, settings.seed, weights, lengths, settings.max_length)
    else:
        probs = balanced_row_probs(train.column("labels")) if settings.balance else None
        sampler = LengthGroupedSampler(plan, settings.seed, weights, lengths, probs)
    return Batches(sampler, settings.packing)


class PackedCollate:
    """Model rows made of several sequences → input_ids, labels, position_ids restarting per sequence, and the
    attention that keeps sequences apart: a block-diagonal causal mask (sdpa: bool, True attends; eager: additive
    float), or none with flash_attention_2, which reads the boundaries from position_ids of a single row."""

    def __init__(self, task: TaskHooks, attn_implementation: str):
        tokenizer = task.tok
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.attn = attn_implementation

    def __call__(self, groups: list[list[dict]]) -> dict[str, torch.Tensor]:
        if self.attn == "flash_attention_2":  # varlen attention needs one row: all sequences back to back
            groups = [[row for group in groups for row in group]]
        width = max(sum(len(r["input_ids"]) for r in group) for group in groups)
        shape = (len(groups), width)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        segments = torch.zeros(shape, dtype=torch.long)
        for g, group in enumerate(groups):
            start = 0
            for s, row in enumerate(group):
                n = len(row["input_ids"])
                ids[g, start : start + n] = torch.tensor(row["input_ids"])
                labels[g, start + 1 : start + n] = torch.tensor(row["labels"][1:])  # not the first: see above
                positions[g, start : start + n] = torch.arange(n)
                segments[g, start : start + n] = s
                start += n
            positions[g, start:] = torch.arange(width - start)  # the padding tail: a sequence of its own
            segments[g, start:] = len(group)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
        if self.attn != "flash_attention_2":
            batch["attention_mask"] = block_causal_mask(segments, self.attn)
        return batch


def block_causal_mask(segments: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """[rows, 1, T, T]: position q attends to k ≤ q of its own segment. sdpa takes it as bool (True attends),
    eager adds it to the scores (0 or the float minimum)."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed = allowed[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return allowed


class Collator:
    """Model rows (lists of data rows) → a batch: padded one row each (data.packing none), else packed."""

    def __init__(self, task: TaskHooks, recipe: Recipe):
        self.task = task
        self.packed = recipe.data.packing != "none"
        self.plain = Collate(task)
        self.pack = PackedCollate(task, recipe.model.attn_implementation)

    def __call__(self, groups: list[list[dict]]) -> dict[str, torch.Tensor]:
        return self.pack(groups) if self.packed else self.plain([group[0] for group in groups])
