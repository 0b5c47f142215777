"""Baseline (c): transformers' Trainer with the recipe's settings (same AdamW, schedule, clipping, precision).

Timed from `on_train_begin` (model wrapped, dataloader built) to the end of the last optimizer step, the
same window as launch's training_wall_s. Checkpointing is off, logging every 10 steps like the recipe.
Run: python -m torch.distributed.run --nproc-per-node N -m bench.baselines.hf_trainer RECIPE RESULT.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from bench.baselines.shared import read, report, trainer_clock


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def main(recipe_path: str, result_path: str, lora: str = "") -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    setup = read(Path(recipe_path))
    cuda = torch.cuda.is_available()
    times: dict[str, float] = {}

    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    args = TrainingArguments(
        output_dir=str(setup.output_dir),
        per_device_train_batch_size=setup.global_batch // world,
        max_steps=setup.max_steps,
        learning_rate=setup.lr,
        weight_decay=setup.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=setup.warmup_steps,
        max_grad_norm=setup.grad_clip,
        optim="adamw_torch",
        bf16=setup.precision == "bf16",
        fp16=setup.precision == "fp16",
        use_cpu=not cuda,
        ddp_backend="nccl" if cuda else "gloo",
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(setup.model)
    if lora:
        from peft import LoraConfig, get_peft_model

        rank, alpha = (int(x) for x in lora.split(","))
        model = get_peft_model(
            model,
            LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(setup.input_ids), callbacks=[trainer_clock(times)])
    result = trainer.train()
    report(
        Path(result_path),
        rank=args.process_index,
        steps=setup.max_steps,
        samples=setup.max_steps * setup.global_batch,
        train_wall=times["end"] - times["start"],
        train_cpu=times["cpu_end"] - times["cpu_start"],
        final_loss=result.training_loss,
        t_first_step=times["first"],
        world_size=args.world_size,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
