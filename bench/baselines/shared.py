"""What both baselines read from the recipe `launch` trains: model, data, batch, steps, optimizer, precision.

Tokenization matches launcher.train.data for causal_lm on the benchmark's fixed-length texts: every row
is exactly `data.max_length` tokens, so no padding differs between the three trainers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml


@dataclass
class Setup:
    model: str
    input_ids: torch.Tensor  # [rows, seq_len]
    global_batch: int
    max_steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    precision: str
    output_dir: Path


def read(recipe_path: Path) -> Setup:
    from transformers import AutoTokenizer

    recipe = yaml.safe_load(recipe_path.read_text())
    base = recipe_path.parent
    model = str((base / recipe["model"]["path"]).resolve())
    data, train = recipe["data"], recipe["train"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    lines = (base / data["train"]).read_text().splitlines()
    rows = [json.loads(line)["text"] for line in lines if line.strip()]
    ids = tokenizer(rows, truncation=True, max_length=data["max_length"])["input_ids"]
    if {len(r) for r in ids} != {data["max_length"]}:
        raise ValueError("benchmark rows must all fill data.max_length (see bench.common.fixed_length_lm_data)")
    return Setup(
        model=model,
        input_ids=torch.tensor(ids),
        global_batch=train["batch_size"],
        max_steps=train["max_steps"],
        lr=train["optimizer"]["lr"],
        weight_decay=train["optimizer"]["weight_decay"],
        warmup_steps=train["scheduler"]["warmup_steps"],
        grad_clip=train["grad_clip"],
        precision=train["precision"],
        output_dir=Path(recipe["output_dir"]),
    )


def trainer_clock(times: dict[str, float]):
    """A transformers TrainerCallback timing the window launch's training_wall_s covers: from on_train_begin
    (model wrapped, dataloader built) to the end of the last optimizer step (`times`: start, first, end, and
    the CPU time of the window)."""
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times["start"], times["cpu_start"] = time.time(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times.setdefault("first", time.time())
            if state.global_step == args.max_steps:
                if cuda:
                    torch.cuda.synchronize()
                times["end"], times["cpu_end"] = time.time(), time.process_time()

    return Clock()


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(
    path: Path,
    *,
    rank: int,
    steps: int,
    samples: int,
    train_wall: float,
    train_cpu: float,
    final_loss: float,
    t_first_step: float,
    **extra,
) -> None:
    """Rank 0 writes what `launch` writes to summary.json's timings, measured the same way."""
    if rank != 0:
        return
    t0 = float(os.environ["BENCH_T0"]) if "BENCH_T0" in os.environ else None
    path.write_text(
        json.dumps(
            {
                "steps": steps,
                "training_wall_s": train_wall,
                "training_cpu_s": train_cpu,
                "samples_per_s": samples / train_wall,
                "final_loss": final_loss,
                "time_to_first_step_s": (t_first_step - t0) if t0 else None,
                "peak_memory_bytes": peak_memory_bytes(),
                **extra,
                "time": time.time(),
            }
        )
    )
