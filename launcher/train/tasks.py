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


def as_rows(columns: dict[str, list]) -> list[dict]:
    """A batch as datasets.map hands it (column → values) → one dict per row."""
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def as_columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


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
        return as_rows(self._encode(as_columns([row])))[0]

    def tokenize_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """Columns of clean rows → columns of tokenized rows: what the cache's batched datasets.map calls. The
        built-in tasks make one fast-tokenizer call per batch; a subclass that overrides `tokenize` gets it
        called row by row (so overriding `tokenize` alone is always enough)."""
        if self._batched(TaskHooks):
            return self._encode(batch)
        return as_columns([self.tokenize(row) for row in as_rows(batch)])

    def _batched(self, owner: type) -> bool:
        """`owner`'s batched encoding applies: this object's tokenize is still owner's own."""
        return type(self).tokenize is owner.tokenize

    def _encode(self, batch: dict[str, list]) -> dict[str, list]:
        enc = self.tok(batch["text"], batch.get("text_pair"), truncation=True, max_length=self.max_length)
        return {
            **{k: list(v) for k, v in enc.items()},
            "labels": list(batch["label"]),
            "weight": [1] * len(enc["input_ids"]),
        }

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
        """What evaluation keeps of a batch for the metrics (launcher.train.metrics.EvalOutputs.scores):
        class probabilities, or predictions; None when the loss alone is scored (perplexity)."""
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
        return as_rows(self._encode(as_columns([row])))[0]

    def tokenize_batch(self, batch):
        return self._encode(batch) if self._batched(TokenClassification) else super().tokenize_batch(batch)

    def _encode(self, batch):
        enc = self.tok(batch["text"], is_split_into_words=True, truncation=True, max_length=self.max_length)
        all_labels, weights = [], []
        for i, tags in enumerate(batch["label"]):
            labels, previous = [], None
            for word in enc.word_ids(i):
                labels.append(IGNORE if word is None or word == previous else tags[word])
                previous = word
            all_labels.append(labels)
            weights.append(sum(1 for x in labels if x != IGNORE))
        return {**{k: list(v) for k, v in enc.items()}, "labels": all_labels, "weight": weights}

    def eval_outputs(self, logits, labels):
        keep = labels != IGNORE
        return logits[keep].softmax(-1).cpu().numpy(), labels[keep].cpu().numpy()


class CausalLM(TokenLevel):
    def tokenize(self, row):
        """Plain text: every token is a target. Prompt/response (SFT): the prompt is masked out of the loss,
        and the response ends with EOS so the model learns to stop."""
        return as_rows(self._encode(as_columns([row])))[0]

    def tokenize_batch(self, batch):
        return self._encode(batch) if self._batched(CausalLM) else super().tokenize_batch(batch)

    def _encode(self, batch):
        tok, max_length = self.tok, self.max_length
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if "prompt" not in batch:
            texts = tok(batch["text"], add_special_tokens=True)["input_ids"]
            pairs = [([], ids + eos) for ids in texts]
        elif self.recipe.task.chat_template:
            pairs = [self._chat(prompt, response, eos) for prompt, response in zip(batch["prompt"], batch["response"])]
        else:
            prompts = tok(batch["prompt"], add_special_tokens=True)["input_ids"]
            responses = tok(batch["response"], add_special_tokens=False)["input_ids"]
            pairs = [(prompt, prompt + response + eos) for prompt, response in zip(prompts, responses)]
        out = {"input_ids": [], "attention_mask": [], "labels": [], "weight": []}
        for prompt, full in pairs:
            ids = full[:max_length]
            masked = min(len(prompt), len(ids))
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE] * masked + ids[masked:])
            out["weight"].append(max(0, len(ids) - max(masked, 1)))  # next-token targets: labels[1:] not IGNORE
        return out

    def _chat(self, prompt: str, response: str, eos: list[int]) -> tuple[list[int], list[int]]:
        tok = self.tok
        user = [{"role": "user", "content": prompt}]
        prompt_ids = list(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False))
        turns = user + [{"role": "assistant", "content": response}]
        full = list(tok.apply_chat_template(turns, tokenize=True, return_dict=False))
        if full[: len(prompt_ids)] != prompt_ids:  # templates that re-render the prompt differently
            full = prompt_ids + tok(response, add_special_tokens=False)["input_ids"] + eos
        return prompt_ids, full

    def eval_outputs(self, logits, labels):
        return None


class Seq2Seq(TokenLevel):
    def tokenize(self, row):
        return as_rows(self._encode(as_columns([row])))[0]

    def tokenize_batch(self, batch):
        return self._encode(batch) if self._batched(Seq2Seq) else super().tokenize_batch(batch)

    def _encode(self, batch):
        enc = self.tok(batch["prompt"], truncation=True, max_length=self.max_length)
        targets = self.tok(text_target=batch["response"], truncation=True, max_length=self.max_length)["input_ids"]
        targets = [list(t) for t in targets]
        return {**{k: list(v) for k, v in enc.items()}, "labels": targets, "weight": [len(t) for t in targets]}

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
