"""Baseline (b): the minimal training loop a user writes by hand with Accelerate.

AdamW, linear warm-up, gradient clipping, mixed precision from the recipe; no logging, no checkpoints.
The timed window matches launch's summary.json: from just before the first step to the end of the last.
Run: python -m torch.distributed.run --nproc-per-node N -m bench.baselines.accelerate_loop RECIPE RESULT.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bench.baselines.shared import read, report


def main(recipe_path: str, result_path: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from transformers import AutoModelForCausalLM, get_scheduler

    setup = read(Path(recipe_path))
    cuda = torch.cuda.is_available()
    acc = Accelerator(
        cpu=not cuda,
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[setup.precision],
        kwargs_handlers=[InitProcessGroupKwargs(backend="nccl" if cuda else "gloo")],
    )
    set_seed(0)
    micro = setup.global_batch // acc.num_processes
    model = AutoModelForCausalLM.from_pretrained(setup.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=setup.weight_decay)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=setup.warmup_steps, num_training_steps=setup.max_steps
    )
    model, optimizer = acc.prepare(model, optimizer)
    # Each rank takes its own slice of every global batch, like launch's sampler; no DataLoader machinery.
    order = torch.randperm(len(setup.input_ids), generator=torch.Generator().manual_seed(0))
    model.train()
    t_start, cpu_start = time.time(), time.process_time()
    t_first = None
    for step in range(setup.max_steps):
        rows = order[step * setup.global_batch : (step + 1) * setup.global_batch][acc.process_index * micro :][:micro]
        ids = setup.input_ids[rows].to(acc.device)
        with acc.autocast():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), setup.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if t_first is None:
            t_first = time.time()
    final_loss = loss.item()  # also waits for the device
    train_wall, train_cpu = time.time() - t_start, time.process_time() - cpu_start
    report(
        Path(result_path),
        rank=acc.process_index,
        steps=setup.max_steps,
        samples=setup.max_steps * setup.global_batch,
        train_wall=train_wall,
        train_cpu=train_cpu,
        final_loss=final_loss,
        t_first_step=t_first,
        world_size=acc.num_processes,
    )
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
