"""Token-level accounting of training: tokens per second, padding, step times per rank, data wait, MFU, and
the straggler.

Each rank times its own steps (start → data ready → the first forward → optimizer done) and counts its
tokens (train.feed.StepCounts). At each flush of the step losses (train.report), one all-gather brings every
rank's window to every rank, so the figures are of the whole world:

    input / trained tokens per second   tokens fed (no padding) / loss targets, over the window's wall time
    padding_fraction                    computed positions that were padding
    step time p50 / p95 per rank        and the data-wait fraction: time the loop waited for its batch
    mfu                                 model FLOPs (launcher.planning.flops) / wall / world / peak per device
    straggler                           a rank whose median time alone, before the step's first forward
                                        (waiting for and preparing its batch, whatever else delays its host),
                                        exceeds distributed.straggler_factor × the median over ranks. From the
                                        first forward on, collectives (DDP's buffer broadcast and gradient
                                        all-reduce, ZeRO/FSDP gathers) make every rank wait for the slowest, so
                                        whole-step times are the same everywhere and cannot tell who it is. A rank
                                        slow on the device itself would need device-side timing (CUDA events of
                                        its kernels), which this does not do.

The window runs from the first step after a flush to the end of the next flush (a host-device sync), so on a
GPU the host running ahead of the device does not flatter it, and evaluation and checkpoints stay out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from launcher.planning.flops import mfu, model_flops, peak_flops
from launcher.train.feed import StepCounts

# per rank, in this order, in the all-gather of a flush (alone_p50_s: over the launch so far, so that one hiccup
# of a host in a short window names no straggler)
FIELDS = ("input_tokens", "positions", "trained_tokens", "squared_lengths", "busy_s", "wait_s", "p50_s", "p95_s",
          "alone_p50_s", "steps")  # fmt: skip


MIN_SHARE = 0.05  # a straggler delays every step by more than this fraction of the median step time


@dataclass(frozen=True)
class ModelFlops:
    """What the FLOPs formula needs of the model: dense parameters N, layers L, attention width H."""

    num_dense_params: int
    num_layers: int
    attention_width: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelFlops:
        """N = every parameter but the input embedding (a lookup, not a matmul); a head tied to that embedding
        is a matmul and counts (DeepSpeed ZeRO-3 leaves placeholders: their ds_numel is the real size)."""

        def numel(p) -> int:
            return int(getattr(p, "ds_numel", p.numel()))

        total = sum(numel(p) for p in model.parameters())
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        embedding = numel(embed.weight) if embed is not None else 0
        tied = head is not None and embed is not None and head.weight is embed.weight
        config = model.config
        layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if
                       getattr(config, k, None)), 0)  # fmt: skip
        heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if
                      getattr(config, k, None)), 0)  # fmt: skip
        hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(config, k, None)), 0)
        head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
        return cls(total - embedding + (numel(head.weight) if tied else 0), layers, heads * head_dim)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


@dataclass
class Window:
    counts: StepCounts = field(default_factory=StepCounts)
    step_s: list[float] = field(default_factory=list)
    alone_s: list[float] = field(default_factory=list)  # step start → first forward
    wait_s: float = 0.0
    started: float | None = None


class Throughput:
    """step_start → data_ready(waited) → model_start → step_end(counts) on every step; `flush()` at each flush
    of the losses (a collective: every rank calls it) returns the window's figures for metrics.jsonl."""

    def __init__(self, accelerator, flops: ModelFlops | None, peak_tflops: float | None, straggler_factor: float,
                 log=None, tokens_before: int = 0):  # fmt: skip
        """`tokens_before`: the input tokens earlier launches trained on (the checkpoint's tokens_seen)."""
        self.acc, self.flops, self.factor, self.log = accelerator, flops, straggler_factor, log
        self.tokens_before = tokens_before
        device = accelerator.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak = peak_flops(name, peak_tflops)
        self.window = Window()
        self.all_step_s: list[float] = []
        self.all_alone_s: list[float] = []
        self.totals = np.zeros(len(FIELDS))  # per-world sums over the run: tokens and time
        self.total_wall = 0.0
        self.total_flops = 0.0
        self.stragglers: set[int] = set()
        self.per_rank: list[dict] = []

    # ------------------------------------------------------------------ each step
    def step_start(self) -> None:
        now = time.perf_counter()
        self._t0 = now
        if self.window.started is None:
            self.window.started = now

    def data_ready(self, waited: float) -> None:
        self.window.wait_s += waited

    def model_start(self) -> None:
        self._t_model = time.perf_counter()

    def step_end(self, counts: StepCounts) -> None:
        now = time.perf_counter()
        w = self.window
        w.step_s.append(now - self._t0)
        w.alone_s.append(getattr(self, "_t_model", now) - self._t0)
        for name in ("input_tokens", "positions", "trained_tokens", "squared_lengths"):
            setattr(w.counts, name, getattr(w.counts, name) + getattr(counts, name))

    # ------------------------------------------------------------------ each flush
    def flush(self) -> dict:
        w = self.window
        if not w.step_s:
            return {}
        mine = [w.counts.input_tokens, w.counts.positions, w.counts.trained_tokens, w.counts.squared_lengths,
                sum(w.step_s), w.wait_s, percentile(w.step_s, 50), percentile(w.step_s, 95),
                percentile(self.all_alone_s + w.alone_s, 50), len(w.step_s)]  # fmt: skip
        ranks = self.acc.gather(torch.tensor([mine], dtype=torch.float64, device=self.acc.device)).cpu().numpy()
        wall = time.perf_counter() - w.started
        self.all_step_s += w.step_s
        self.all_alone_s += w.alone_s
        self.window = Window()
        col = {name: ranks[:, i] for i, name in enumerate(FIELDS)}
        flops = self._flops(col)
        self.totals += ranks.sum(axis=0)
        self.total_wall += wall
        self.total_flops += flops or 0.0
        straggler = self._straggler(col["alone_p50_s"], float(np.median(col["p50_s"])))
        return {
            "input_tokens_per_s": col["input_tokens"].sum() / wall,
            "trained_tokens_per_s": col["trained_tokens"].sum() / wall,
            "padding_fraction": 1 - col["input_tokens"].sum() / max(col["positions"].sum(), 1),
            "mfu": mfu(flops, wall, self.acc.num_processes, self.peak) if flops is not None else None,
            "step_time_p50_s": [round(float(x), 5) for x in col["p50_s"]],
            "step_time_p95_s": [round(float(x), 5) for x in col["p95_s"]],
            "data_wait_fraction": [round(float(x), 5) for x in col["wait_s"] / np.maximum(col["busy_s"], 1e-12)],
            "straggler": straggler,
        }

    def _flops(self, col) -> float | None:
        if self.flops is None:
            return None
        f = self.flops
        tokens, squares = col["input_tokens"].sum(), col["squared_lengths"].sum()
        return model_flops(f.num_dense_params, f.num_layers, f.attention_width, tokens, squares)

    def _straggler(self, alone: np.ndarray, step_s: float) -> int | None:
        """The rank over factor × the median, when what it costs the others is worth naming: more than
        MIN_SHARE of a step (a few milliseconds of host jitter are 3× a median of one)."""
        if len(alone) < 2:
            return None
        median = float(np.median(alone))
        worst = int(np.argmax(alone))
        if alone[worst] <= self.factor * median or alone[worst] - median <= MIN_SHARE * step_s:
            return None
        if worst not in self.stragglers and self.log is not None and self.acc.is_main_process:
            self.log.warning(
                f"straggler: rank {worst} takes {alone[worst]:.3f} s per step before its first forward "
                f"(median over ranks {median:.3f} s, {alone[worst] / max(median, 1e-12):.1f}×; "
                f"distributed.straggler_factor {self.factor:g}); every rank waits for it at the collectives"
            )
        self.stragglers.add(worst)
        return worst

    # ------------------------------------------------------------------ the run
    @property
    def tokens_seen(self) -> int:
        """Non-padding input tokens trained on up to the last flush: every rank, this launch and earlier ones
        (summary.json's trained_tokens, a checkpoint's tokens_seen)."""
        return self.tokens_before + int(self.totals[FIELDS.index("input_tokens")])

    def summary(self) -> dict | None:
        """summary.json's throughput: totals over this launch's flushed windows, and per-rank step times (one
        all-gather: every rank calls it)."""
        times = self.all_step_s or [0.0]
        mine = [percentile(times, 50), percentile(times, 95), percentile(self.all_alone_s or [0.0], 50)]
        ranks = self.acc.gather(torch.tensor([mine], dtype=torch.float64, device=self.acc.device)).cpu().numpy()
        if not self.total_wall:
            return None
        t = dict(zip(FIELDS, self.totals))
        return {
            "input_tokens": int(t["input_tokens"]),
            "trained_tokens": float(t["trained_tokens"]),
            "computed_positions": int(t["positions"]),
            "padding_fraction": 1 - t["input_tokens"] / max(t["positions"], 1),
            "input_tokens_per_s": t["input_tokens"] / self.total_wall,
            "trained_tokens_per_s": t["trained_tokens"] / self.total_wall,
            "data_wait_fraction": t["wait_s"] / max(t["busy_s"], 1e-12),
            "flops": self.total_flops or None,
            "mfu": mfu(self.total_flops, self.total_wall, self.acc.num_processes, self.peak),
            "peak_flops_per_device": self.peak,
            "step_time_s_per_rank": [
                {"p50": float(r[0]), "p95": float(r[1]), "before_first_forward_p50": float(r[2])} for r in ranks
            ],  # fmt: skip
            "stragglers": sorted(self.stragglers),
            "wall_s": self.total_wall,
        }
