"""Baseline: TRL's SFTTrainer on the recipe `launch` trains (bench.sft_throughput): same model, prompt/response
data, LoRA, max_length, global batch, steps, optimizer, schedule, clipping, fp32, threads.

TRL defaults that would make it a different run are set to launch's: bf16 autocast off (TRL turns it on),
gradient checkpointing off (TRL turns it on), no dataset shuffling difference that matters for speed, prompt
masked (completion_only_loss), sdpa attention. `packing` packs by best-fit decreasing into bins of max_length
and runs padding-free (position_ids; transformers keeps the sequences apart from them).

Trained tokens are counted from every batch the trainer steps on (labels that are a next-token target), and
timed like the HF Trainer baseline (bench.baselines.shared.trainer_clock).
Run: python -m bench.baselines.trl_sft RECIPE RESULT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from bench.baselines.shared import report, trainer_clock


def rows(path: Path, prompt: str, response: str, chat: bool) -> list[dict]:
    found = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if chat:
                found.append(
                    {
                        "prompt": [{"role": "user", "content": row[prompt]}],
                        "completion": [{"role": "assistant", "content": row[response]}],
                    }
                )
            else:
                found.append({"prompt": row[prompt], "completion": " " + row[response]})
    return found


def main(recipe_path: str, result_path: str) -> None:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    recipe = yaml.safe_load(Path(recipe_path).read_text())
    data, train, lora = recipe["data"], recipe["train"], recipe["model"]["lora"]
    cuda = torch.cuda.is_available()
    times: dict[str, float] = {}
    trained = [0]

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            trained[0] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, *args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(recipe["model"]["path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        recipe["model"]["path"], dtype=torch.float32, attn_implementation="sdpa"
    )
    packing = data.get("packing", "none") != "none"
    args = SFTConfig(
        output_dir=recipe["output_dir"],
        max_length=data["max_length"],
        packing=packing,
        completion_only_loss=True,
        per_device_train_batch_size=train["batch_size"],
        max_steps=train["max_steps"],
        learning_rate=train["optimizer"]["lr"],
        weight_decay=train["optimizer"]["weight_decay"],
        lr_scheduler_type="linear",
        warmup_steps=train["scheduler"]["warmup_steps"],
        max_grad_norm=train["grad_clip"],
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not cuda,
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    peft = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    chat = bool(recipe["task"].get("chat_template"))
    dataset = datasets.Dataset.from_list(rows(Path(data["train"]), data["prompt_field"], data["response_field"], chat))
    trainer = Counting(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[trainer_clock(times)],
    )
    result = trainer.train()
    wall = times["end"] - times["start"]
    report(
        Path(result_path),
        rank=0,
        steps=train["max_steps"],
        samples=train["max_steps"] * train["batch_size"],
        train_wall=wall,
        train_cpu=times["cpu_end"] - times["cpu_start"],
        final_loss=result.training_loss,
        t_first_step=times["first"],
        trained_tokens=trained[0],
        trained_tokens_per_s=trained[0] / wall,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
