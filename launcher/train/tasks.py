"""The rank-side half of each task type: tokenize a row, collate its labels, feed the model, keep eval outputs.

One class per entry of the task registry (launcher.config.tasks.TASKS, field `rank_hooks`); `hooks(recipe,
tokenizer)` builds the one the recipe's task names. The training loop, the evaluator and the data pipeline
call these methods and never ask which task they run.
"""

from __future__ import annotations

import numpy as np
import torch

from launcher.config.recipe import Recipe

IGNORE = -100  # label of a position that carries no loss (padding, a prompt token, a word's later sub-words)


class TaskHooks:
    """A sequence-level task: one text (and optional pair) in, one label out. Subclasses change what differs."""

    label_dtype = torch.long

    def __init__(self, recipe: Recipe, tokenizer):
        self.recipe, self.tok = recipe, tokenizer
        self.spec = recipe.task.spec
        self.max_length = recipe.data.max_length

    def tokenize(self, row: dict) -> dict:
        """One clean row (launcher.planning.data_files) → model inputs, `labels`, and `weight`: how many loss
        terms it contributes (the loop normalises by the global batch's sum of weights)."""
        enc = self.tok(row["text"], row.get("text_pair"), truncation=True, max_length=self.max_length)
        return {**dict(enc), "labels": row["label"], "weight": 1}

    def collate_labels(self, rows: list[dict]) -> torch.Tensor:
        return torch.tensor([r["labels"] for r in rows], dtype=self.label_dtype)

    def model_inputs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**self.model_inputs(model, batch)).logits

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn) -> torch.Tensor:
        """The micro-batch's summed loss, what backward runs on (train.run calls it inside the engine's
        accumulation context and autocast). A task whose loss needs more than the logits (several forward
        passes, a reference model, hidden states) overrides this and `evaluate`."""
        return loss_fn(self.logits(model, batch), batch["labels"])

    def evaluate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn):
        """One evaluation batch (no grad, inside autocast): its summed loss, and what eval_outputs keeps."""
        logits = self.logits(model, batch).float()
        return float(loss_fn(logits, batch["labels"])), self.eval_outputs(logits, batch["labels"])

    def eval_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """What evaluation folds into its statistics for a batch (launcher.train.metrics.EvalOutputs.add):
        (class probabilities or predictions, labels); a dict of named sums for a metric of its own (a metric
        then reads `out.sums[name]`); None when the loss alone is scored (perplexity). Nothing is kept whole
        but ROC-AUC's scores."""
        return logits.softmax(-1).cpu().numpy(), labels.cpu().numpy()


class SequenceClassification(TaskHooks):
    pass


class MultiLabelClassification(TaskHooks):
    label_dtype = torch.float32

    def eval_outputs(self, logits, labels):
        return logits.sigmoid().cpu().numpy(), labels.cpu().numpy()


class Regression(TaskHooks):
    label_dtype = torch.float32

    def eval_outputs(self, logits, labels):
        return logits.reshape(-1).cpu().numpy(), labels.cpu().numpy()


class TokenLevel(TaskHooks):
    """Labels per token, padded with IGNORE to the batch's longest row."""

    def collate_labels(self, rows):
        width = max(len(r["labels"]) for r in rows)
        return torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])


class TokenClassification(TokenLevel):
    def tokenize(self, row):
        """The word's label on its first sub-word; later sub-words and special tokens are IGNORE."""
        enc = self.tok(row["text"], is_split_into_words=True, truncation=True, max_length=self.max_length)
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(IGNORE if word is None or word == previous else row["label"][word])
            previous = word
        return {**dict(enc), "labels": labels, "weight": sum(1 for x in labels if x != IGNORE)}

    def eval_outputs(self, logits, labels):
        keep = labels != IGNORE
        return logits[keep].softmax(-1).cpu().numpy(), labels[keep].cpu().numpy()


class CausalLM(TokenLevel):
    def tokenize(self, row):
        """Plain text: every token is a target. Prompt/response (SFT): the prompt is masked out of the loss,
        and the response ends with EOS so the model learns to stop."""
        tok, max_length = self.tok, self.max_length
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if "prompt" not in row:
            ids = tok(row["text"], add_special_tokens=True)["input_ids"] + eos
            ids = ids[:max_length]
            labels = list(ids)
        else:
            if self.recipe.task.chat_template:
                user = [{"role": "user", "content": row["prompt"]}]
                prompt = list(
                    tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
                )
                turns = user + [{"role": "assistant", "content": row["response"]}]
                full = list(tok.apply_chat_template(turns, tokenize=True, return_dict=False))
                if full[: len(prompt)] != prompt:  # templates that re-render the prompt differently
                    full = prompt + tok(row["response"], add_special_tokens=False)["input_ids"] + eos
            else:
                prompt = tok(row["prompt"], add_special_tokens=True)["input_ids"]
                full = prompt + tok(row["response"], add_special_tokens=False)["input_ids"] + eos
            ids = full[:max_length]
            labels = [IGNORE] * min(len(prompt), len(ids)) + ids[len(prompt) :]
        weight = sum(1 for x in labels[1:] if x != IGNORE)  # next-token targets
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "weight": weight}

    def eval_outputs(self, logits, labels):
        return None


class Seq2Seq(TokenLevel):
    def tokenize(self, row):
        enc = self.tok(row["prompt"], truncation=True, max_length=self.max_length)
        target = self.tok(text_target=row["response"], truncation=True, max_length=self.max_length)["input_ids"]
        return {**dict(enc), "labels": target, "weight": len(target)}

    def model_inputs(self, model, batch):
        """The decoder reads the target shifted right (teacher forcing), made by the model itself."""
        inputs = super().model_inputs(model, batch)
        inner = getattr(model, "module", model)  # DDP / DeepSpeed wrap the model
        inputs["decoder_input_ids"] = inner.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return inputs

    def eval_outputs(self, logits, labels):
        return None


def hooks_class(rank_hooks: str) -> type[TaskHooks]:
    """The class a registry entry names (a test checks every entry names one)."""
    found = globals().get(rank_hooks)
    if not (isinstance(found, type) and issubclass(found, TaskHooks)):
        raise LookupError(f"launcher.train.tasks has no task hooks class {rank_hooks!r}")
    return found


def hooks(recipe: Recipe, tokenizer) -> TaskHooks:
    """The rank-side hooks of the recipe's task type."""
    return hooks_class(recipe.task.spec.rank_hooks)(recipe, tokenizer)
