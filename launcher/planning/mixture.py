"""Weighted mixtures of training sources: how many samples each source gives an epoch, and which.

An epoch of a mixture has as many samples as the sources have rows together (N); source i gives k_i of
them, its weight's share of N (data.mix_by: rows), or of the tokens (mix_by: tokens: k_i ∝ weight_i / mean
tokens per row of source i), rounded by largest remainder so that the k_i add up to N exactly. Which k_i rows:
positions [e·k_i, (e+1)·k_i) of the source's endless stream of seeded permutations, so every row is used once
before any row is used twice, and a smaller share takes different rows each epoch. Everything is a function of
(seed, epoch): the sampler stays stateless, and resume is exact at any world size. Without weights an epoch is
every row once, in one seeded permutation (what the sampler always did). Torch-free: the plan shows the
shares, the ranks draw the epochs.
"""

from __future__ import annotations

import numpy as np


def largest_remainder(total: int, shares: list[float]) -> list[int]:
    """`total` split in proportion to `shares`, as integers that add up to `total` exactly."""
    whole = sum(shares)
    exact = [total * s / whole for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def samples_per_epoch(
    rows: list[int], weights: list[float] | None, mix_by: str = "rows", tokens: list[int] | None = None
) -> list[int] | None:
    """k_i for each source (rows[i] rows, tokens[i] tokens); None when mixing by tokens before tokenization."""
    if weights is None:
        return list(rows)
    if mix_by == "tokens":
        if tokens is None:
            return None
        weights = [w * n / t if t else 0.0 for w, n, t in zip(weights, rows, tokens)]
    return largest_remainder(sum(rows), weights)


def source_picks(num_rows: int, per_epoch: int, seed: int, source: int, epoch: int) -> np.ndarray:
    """Row indices (within the source) of its `per_epoch` samples in `epoch`."""
    start, end = epoch * per_epoch, (epoch + 1) * per_epoch
    parts = []
    for cycle in range(start // num_rows, (end - 1) // num_rows + 1 if per_epoch else 0):
        order = np.random.default_rng([seed, source, cycle]).permutation(num_rows)
        lo, hi = max(start - cycle * num_rows, 0), min(end - cycle * num_rows, num_rows)
        parts.append(order[lo:hi])
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def epoch_order(rows: list[int], per_epoch: list[int] | None, seed: int, epoch: int) -> np.ndarray:
    """The epoch's samples as indices into the sources' rows laid end to end, shuffled."""
    rng = np.random.default_rng([seed, epoch])
    if per_epoch is None or per_epoch == rows:
        return rng.permutation(sum(rows))
    offsets = np.cumsum([0, *rows[:-1]])
    picked = [offsets[i] + source_picks(n, k, seed, i, epoch) for i, (n, k) in enumerate(zip(rows, per_epoch))]
    return rng.permutation(np.concatenate(picked))


def source_of(index: np.ndarray, rows: list[int]) -> np.ndarray:
    """Which source each index (into the sources laid end to end) belongs to."""
    return np.searchsorted(np.cumsum(rows), index, side="right")
