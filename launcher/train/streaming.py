"""data.streaming: the training rows read as the run goes, tokenized a global batch at a time on every rank.

For data larger than the disk. The stream is one global sequence of samples, the same on every rank and at
any world size: position p comes from the source the schedule gives it (a weighted round robin: the shares
of the weights are exact, within one sample, at every position), and each source yields its clean rows file
after file through a seeded shuffle buffer (data.shuffle_buffer), starting over with a new shuffle when it
ends. Optimizer step s
trains on positions [s·B, (s+1)·B): every rank tokenizes those B rows (so it knows the global batch's loss
terms without communicating) and keeps its own micro-batches, laid out as the map-style sampler lays them
out. Resuming at step s reads past the first s·B samples without tokenizing them, so the position in samples
is the whole state: exact at any world size, in a time that grows with the position (a file stream has no
index to seek to).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from itertools import count, islice

import numpy as np

from launcher.config.recipe import Recipe
from launcher.errors import Problem, RecipeError
from launcher.planning.data_files import clean_batches
from launcher.planning.plan import Plan
from launcher.planning.sources import resolve
from launcher.train.data import StepBatch
from launcher.train.tasks import TaskHooks, as_columns, as_rows


def shuffled(rows: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A shuffle buffer: each row out is drawn from the `size` rows read last (size 1: file order)."""
    buffer: list[dict] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = row
    rng.shuffle(buffer)
    yield from buffer


def source_stream(recipe: Recipe, index: int) -> Iterator[dict]:
    """One training source's clean rows for ever: cycle c is the source again, shuffled by (seed, index, c)."""
    source = recipe.data.train[index]
    for cycle in count():
        resolved = resolve(source, "train", streaming=True)
        rows = (row for batch in clean_batches(recipe, resolved) for row in batch)
        rng = np.random.default_rng([recipe.data.seed, index, cycle])
        empty = True
        for row in shuffled(rows, recipe.data.shuffle_buffer, rng):
            empty = False
            yield row
        if empty:
            raise RecipeError("data", [Problem("data.train", f"{source.label} holds no usable rows")])


class Schedule:
    """Which source each position of the stream comes from: smooth weighted round robin over integer weights,
    so that after any p samples source i has given p·w_i/Σw of them, within one (exact proportions at every
    position, not only on average; the rows within a source are what the seeded shuffle mixes)."""

    def __init__(self, recipe: Recipe):
        shares = [Fraction(s.weight or 1.0).limit_denominator(10**6) for s in recipe.data.train]
        scale = math.lcm(*(f.denominator for f in shares))
        self.weights = [int(f * scale) for f in shares]
        self.total = sum(self.weights)
        self.credit = [0] * len(self.weights)
        self.counts = [0] * len(self.weights)

    def next(self) -> int:
        if len(self.weights) == 1:
            self.counts[0] += 1
            return 0
        credit = self.credit
        for i, w in enumerate(self.weights):
            credit[i] += w
        j = max(range(len(credit)), key=lambda i: (credit[i], -i))
        credit[j] -= self.total
        self.counts[j] += 1
        return j

    def advance(self, positions: int) -> list[int]:
        """Move `positions` samples on; how many each source gave (what a resume reads past)."""
        before = list(self.counts)
        if len(self.weights) == 1:
            self.counts[0] += positions
        else:
            for _ in range(positions):
                self.next()
        return [after - b for after, b in zip(self.counts, before)]


class GlobalStream:
    """The samples from `start` on; the rows before it are read past, not tokenized."""

    def __init__(self, recipe: Recipe, start: int, progress: Callable[[], None] = lambda: None):
        self.schedule, self.position = Schedule(recipe), start
        self.sources = [source_stream(recipe, i) for i in range(len(recipe.data.train))]
        for stream, skip in zip(self.sources, self.schedule.advance(start)):
            for done in range(0, skip, 10_000):  # the heartbeat advances: a long skip is no hang
                for _ in islice(stream, min(10_000, skip - done)):
                    pass
                progress()

    def take(self, n: int) -> list[dict]:
        rows = [next(self.sources[self.schedule.next()]) for _ in range(n)]
        self.position += n
        return rows


class StreamingTrain:
    """The training split and its sampler in one: `batch(step, rank)` reads and tokenizes the global batch of
    `step`; `self[position]` is a tokenized row of it."""

    def __init__(self, recipe: Recipe, plan: Plan, task: TaskHooks, progress: Callable[[], None] = lambda: None):
        self.recipe, self.plan, self.task, self.progress = recipe, plan, task, progress
        self.stream: GlobalStream | None = None
        self.window: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.plan.num_train_samples

    def __getitem__(self, position: int) -> dict:
        return self.window[position]

    def rows(self, positions) -> list[dict]:
        """The rows at these positions of the last global batch read (as SplitView.rows gives a split's)."""
        return [self.window[p] for p in positions]

    def batch(self, step: int, rank: int) -> StepBatch:
        plan = self.plan
        size, start = plan.global_batch_size, step * plan.global_batch_size
        if self.stream is None or self.stream.position != start:
            self.stream = GlobalStream(self.recipe, start, self.progress)
        rows = as_rows(self.task.tokenize_batch(as_columns(self.stream.take(size))))
        self.window = {start + j: row for j, row in enumerate(rows)}
        micro, world = plan.micro_batch_size, plan.world_size
        chunks = [
            list(range(start + (a * world + rank) * micro, start + (a * world + rank + 1) * micro))
            for a in range(plan.grad_accum)
        ]
        return StepBatch(chunks, float(sum(row["weight"] for row in rows)))
