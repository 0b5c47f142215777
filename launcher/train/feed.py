"""The training batches, collated ahead of the step on a background thread, so the device never waits on Python.

While step s trains, a thread picks and collates the micro-batches of the next steps (the sampler is a pure
function of the step: this changes no batch, only when it is made) into pinned host memory on a GPU; the loop
then copies them with non_blocking=True, which overlaps the copy with the GPU's queued work instead of
blocking the host. The time the loop still waits for a batch is the step's data wait (train.throughput).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from launcher.train.packing import Batches, Collator

AHEAD = 2  # steps collated in advance


@dataclass
class StepCounts:
    """Tokens of one rank's share of a step: real tokens fed, positions computed (with padding), trained
    targets, and Σ len² over its sequences (the attention term of the FLOPs, launcher.planning.flops)."""

    input_tokens: int = 0
    positions: int = 0
    trained_tokens: float = 0.0
    squared_lengths: int = 0


@dataclass
class FedStep:
    micro_batches: list[dict[str, torch.Tensor]]
    global_weight: float
    counts: StepCounts


class Feed:
    """`feed.get(step)` → that step's micro-batches on the device. Steps must be asked for in order, from
    `first` (the resume point); `close()` stops the thread."""

    def __init__(self, batches: Batches, rows, collate: Collator, device: torch.device, rank: int,
                 first: int, last: int):  # fmt: skip
        self.batches, self.rows, self.collate, self.rank = batches, rows, collate, rank
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.next_step = first
        self.ready: queue.Queue = queue.Queue(maxsize=AHEAD)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(first, last), name="launcher-feed", daemon=True)
        self.thread.start()

    def make(self, step: int) -> FedStep:
        """The step's micro-batches collated on the host (what the thread runs)."""
        plan = self.batches(step, self.rank)
        counts = StepCounts()
        micro = []
        for groups in plan.micro_batches:
            rows = [self.rows.rows(group) for group in groups]  # one read of the memory-mapped split per group
            batch = self.collate(rows)
            for group in rows:
                for row in group:
                    for n in self.collate.task.sequence_lengths(row):  # a preference pair: two sequences
                        counts.input_tokens += n
                        counts.squared_lengths += n * n
                    counts.trained_tokens += row["weight"]
            counts.positions += batch["input_ids"].numel()
            micro.append({k: v.pin_memory() for k, v in batch.items()} if self.pin else batch)
        return FedStep(micro, plan.global_weight, counts)

    def _fill(self, first: int, last: int) -> None:
        for step in range(first, last):
            try:
                item = (step, self.make(step))
            except BaseException as exc:  # noqa: BLE001 - raised again in the training loop
                item = (step, exc)
            while not self.stopped.is_set():
                try:
                    self.ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stopped.is_set() or isinstance(item[1], BaseException):
                return

    def get(self, step: int) -> tuple[FedStep, float]:
        """The step's batches on the device, and the seconds the loop waited for them."""
        if step != self.next_step:
            raise RuntimeError(f"the feed is at step {self.next_step}, asked for step {step}")
        start = time.perf_counter()
        got, item = self.ready.get()
        waited = time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        assert got == step, (got, step)
        self.next_step += 1
        item.micro_batches = [
            {k: v.to(self.device, non_blocking=self.pin) for k, v in batch.items()} for batch in item.micro_batches
        ]
        return item, waited

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
