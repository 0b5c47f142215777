"""Sequence packing decided before launch: which rows share a bin of max_length tokens, torch-free.

`data.packing: pack` places the training rows into bins of `data.max_length` tokens by best-fit decreasing
(the longest row first, each into the fullest bin it still fits; Johnson 1974: never more than 11/9 of the
optimum bins + 1). A bin is one row of a micro-batch and `train.batch_size` counts bins, so the plan needs the
number of bins, hence the rows' token lengths: the launcher tokenizes the training split through the ranks' own
cached tokenization (launcher.train.data.prepare, imported only when packing is on), and the ranks read that
cache instead of tokenizing again.

The bins of an epoch are a function of (lengths, seed, epoch) alone: ties between rows of equal length are
broken by the epoch's seeded shuffle, so an epoch's bins differ from the last one's while the bins' fill (and so
their number, the steps per epoch) is the same in every epoch: best-fit decreasing sees only the sorted lengths.
Every rank computes the same bins without communicating, and resume is exact at any world size.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


def best_fit_decreasing(lengths, capacity: int, order=None) -> list[list[int]]:
    """Row indices per bin. `order` (a permutation of the rows) breaks ties between equal lengths: among rows
    of one length, those earlier in `order` are placed first. Every length must be in 1..capacity."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"row lengths must be in 1..{capacity}, got {lengths.min()}..{lengths.max()}")
    rank = np.empty(len(lengths), dtype=np.int64)
    rank[np.arange(len(lengths)) if order is None else np.asarray(order)] = np.arange(len(lengths))
    sequence = np.lexsort((rank, -lengths))  # longest first; ties in `order`
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left → bins with exactly that room (a stack: deterministic)
    rooms: list[int] = []  # the distinct rooms that have a bin, sorted (at most capacity + 1 of them)
    for row in sequence.tolist():
        need = int(lengths[row])
        at = bisect.bisect_left(rooms, need)
        if at == len(rooms):  # fits nowhere: a new bin
            bins.append([row])
            index, room = len(bins) - 1, capacity - need
        else:  # the fullest bin it fits in
            old = rooms[at]
            index = by_room[old].pop()
            if not by_room[old]:
                del by_room[old]
                rooms.pop(at)
            bins[index].append(row)
            room = old - need
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                bisect.insort(rooms, room)
            by_room[room].append(index)
    return bins


def epoch_bins(lengths, capacity: int, seed: int, epoch: int) -> list[list[int]]:
    """The bins of `epoch`: best-fit decreasing with ties broken by the epoch's seeded shuffle."""
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(lengths))
    return best_fit_decreasing(lengths, capacity, order)


@dataclass(frozen=True)
class PackingStats:
    num_rows: int
    num_bins: int
    num_tokens: int
    capacity: int

    @property
    def efficiency(self) -> float:
        """Tokens over the positions of the bins (1.0: no padding at all)."""
        return self.num_tokens / (self.num_bins * self.capacity) if self.num_bins else 0.0


def packing_stats(lengths, capacity: int, seed: int) -> PackingStats:
    bins = epoch_bins(lengths, capacity, seed, 0)
    return PackingStats(len(lengths), len(bins), int(np.sum(lengths)), capacity)


def train_lengths(recipe, data_plan) -> np.ndarray:
    """Token lengths of the training rows: the training sources tokenized into the cache here, before launch
    (what the ranks would otherwise do first; they then only open it), and read from its arrow offsets.
    Imports transformers and torch: only called when data.packing is pack."""
    import datasets

    from launcher.errors import Problem, RecipeError
    from launcher.train.cache import prepare_cache
    from launcher.train.data import open_data
    from launcher.train.model import load_tokenizer

    datasets.disable_progress_bars()
    try:
        tokenizer = load_tokenizer(recipe)
    except (OSError, ValueError) as exc:  # no tokenizer files, a hub id offline
        why = f"counting the bins needs the model's tokenizer, which could not be loaded: {str(exc).splitlines()[0]}"
        raise RecipeError("plan", [Problem("data.packing", why[:300])]) from None
    train_plan = data_plan.model_copy(update={"sources": [s for s in data_plan.sources if s.split == "train"]})
    prepare_cache(recipe, train_plan, tokenizer, say=lambda line: print(f"[launch] data: {line}", flush=True))
    return open_data(recipe, train_plan).train.lengths()
