"""The rank-side half of each task type: tokenize a row, collate its labels, feed the model, keep eval outputs.

One class per entry of the task registry (launcher.config.tasks.TASKS, field `rank_hooks`); `hooks(recipe,
tokenizer)` builds the one the recipe's task names. The training loop, the evaluator and the data pipeline
call these methods and never ask which task they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from launcher.config.recipe import Recipe
from launcher.planning.conversations import Encoded, pair_encoder
from launcher.train.metrics import pair_sums

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

    def collate(self, rows: list[dict], pad: Callable[[list[dict]], dict]) -> dict[str, torch.Tensor]:
        """Rows → a batch; `pad` (train.data.Collate.pad) pads model inputs and calls collate_labels."""
        return pad(rows)

    def collate_labels(self, rows: list[dict]) -> torch.Tensor:
        return torch.tensor([r["labels"] for r in rows], dtype=self.label_dtype)

    def set_up(self, engine, build_model: Callable[[], torch.nn.Module]) -> str | None:
        """Once the engine holds the trained model: what the task needs besides it (a reference model), and a
        line for the log saying what it set up."""
        return None

    def configure(self, plan) -> None:
        """What the plan resolved for this task's forward and loss (the causal-LM loss); called once in set-up."""

    def sequence_lengths(self, row: dict) -> list[int]:
        """The token counts of the sequences a tokenized row becomes in a batch (train.feed's token accounting)."""
        return [len(row["input_ids"])]

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
    lm_loss, lm_loss_chunk = "full", 0  # the plan's train.lm_loss (configure)

    def configure(self, plan) -> None:
        self.lm_loss, self.lm_loss_chunk = plan.lm_loss, self.recipe.train.lm_loss_chunk

    def loss(self, model, batch, loss_fn):
        """`chunked`/`liger`: the head and the loss run over chunks of the trained positions (train.lm_loss)."""
        if self.lm_loss == "full":
            return super().loss(model, batch, loss_fn)
        from launcher.train.lm_loss import lm_loss

        smoothing = getattr(self.recipe.task.resolved_loss, "label_smoothing", 0.0)
        inputs = self.model_inputs(model, batch)
        return lm_loss(model, inputs, batch["labels"], loss_fn, self.lm_loss, self.lm_loss_chunk, smoothing)

    def evaluate(self, model, batch, loss_fn):
        if self.lm_loss == "full":
            return super().evaluate(model, batch, loss_fn)
        return float(self.loss(model, batch, loss_fn)), None

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


class Conversations:
    """Rows rendered with a chat template through the same PairEncoder the launcher checked them with
    (planning.conversations), here over the loaded tokenizer. A recipe's task.chat_template_file replaces the
    tokenizer's template, so the exported tokenizer carries the template the model was trained with."""

    def _pair_encoder(self, recipe: Recipe, tokenizer):
        from launcher.planning.conversations import recipe_template

        template = recipe_template(recipe)
        if template is not None:
            tokenizer.chat_template = template
        try:
            template = tokenizer.get_chat_template()
        except ValueError:  # the tokenizer has none
            template = None

        def encode(text: str, special: bool):
            enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]

        return pair_encoder(recipe, template, dict(tokenizer.special_tokens_map), encode, tokenizer.eos_token)


def labels_of(seq: Encoded) -> list[int]:
    return [t if supervised else IGNORE for t, supervised in zip(seq.ids, seq.mask)]


class ChatSFT(Conversations, CausalLM):
    """Multi-turn SFT: the loss on the assistant's tokens (every assistant turn, or the last: task.train_on)."""

    def __init__(self, recipe, tokenizer):
        super().__init__(recipe, tokenizer)
        self.encoder = self._pair_encoder(recipe, tokenizer)

    def tokenize(self, row):
        seq = self.encoder.conversation(row["messages"])
        return {
            "input_ids": seq.ids,
            "attention_mask": [1] * len(seq.ids),
            "labels": labels_of(seq),
            "weight": seq.num_targets,
        }


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


@dataclass
class PairLogps:
    """Summed log-probabilities of each answer of a batch of pairs, and their token counts (each [B])."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, labels: torch.Tensor) -> PairLogps:
        """From a [chosen..., rejected...] batch: position t scores token t+1 where its label is not IGNORE."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        keep = targets != IGNORE
        logits = logits.float()
        picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        sums, counts = (picked * keep).sum(-1), keep.sum(-1)
        (chosen, rejected), (chosen_n, rejected_n) = sums.chunk(2), counts.chunk(2)
        return cls(chosen, rejected, chosen_n, rejected_n)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """Dropout off for a pass (the reference log-probabilities are the base model's, not a noisy sample)."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


class Pairs(Conversations, TokenLevel):
    """A row is a prompt with a chosen and a rejected answer; a batch of B rows is one [2B, T] batch, the
    chosen sequences first, so one forward pass scores both (and DDP sees one forward per backward)."""

    def __init__(self, recipe, tokenizer):
        super().__init__(recipe, tokenizer)
        self.encoder = self._pair_encoder(recipe, tokenizer)

    def tokenize(self, row):
        chosen, rejected = self.encoder.pair(row)
        return {
            "chosen_input_ids": chosen.ids,
            "chosen_labels": labels_of(chosen),
            "rejected_input_ids": rejected.ids,
            "rejected_labels": labels_of(rejected),
            "weight": 1,  # one loss term per pair
        }

    def sequence_lengths(self, row):
        return [len(row["chosen_input_ids"]), len(row["rejected_input_ids"])]

    def collate(self, rows, pad):
        return pad(
            [
                {"input_ids": r[f"{side}_input_ids"], "attention_mask": [1] * len(r[f"{side}_input_ids"]),
                 "labels": r[f"{side}_labels"]}
                for side in ("chosen", "rejected")
                for r in rows
            ]
        )  # fmt: skip


class Preference(Pairs):
    """DPO, ORPO, SimPO. DPO's reference is the base model: with LoRA the trained model itself with its adapter
    disabled (no second copy), otherwise a frozen copy held like the trained model (engine.frozen: sharded
    under zero3/fsdp), built in set_up."""

    reference: torch.nn.Module | None = None

    def set_up(self, engine, build_model):
        if not self.recipe.task.uses_reference:
            return None
        if self.recipe.model.lora is not None:
            return "reference model: the base, with the LoRA adapter disabled (no copy)"
        self.reference = engine.frozen(build_model())
        local, whole = engine.held_by(self.reference)
        return f"reference model: a frozen copy of the base, {local:,} of its {whole:,} parameters on this rank"

    def logps(self, model, batch, loss_fn) -> tuple[PairLogps, PairLogps | None]:
        policy = PairLogps.of(self.logits(model, batch), batch["labels"])
        if not self.recipe.task.uses_reference:
            return policy, None
        with torch.no_grad():
            if self.reference is not None:
                return policy, PairLogps.of(self.logits(self.reference, batch), batch["labels"])
            peft_model = getattr(model, "module", model)  # DDP and DeepSpeed wrap it; FSDP2 shards it in place
            with peft_model.disable_adapter(), evaluating(peft_model):
                return policy, PairLogps.of(self.logits(peft_model, batch), batch["labels"])

    def loss(self, model, batch, loss_fn):
        return loss_fn(*self.logps(model, batch, loss_fn))

    def evaluate(self, model, batch, loss_fn):
        """Folded into the metrics' sums (train.metrics.pair_sums): the implicit rewards and the policy's
        log-probabilities of chosen and rejected."""
        policy, reference = self.logps(model, batch, loss_fn)
        rewards = torch.stack(loss_fn.rewards(policy, reference), 1)
        logps = torch.stack([policy.chosen, policy.rejected], 1)
        return float(loss_fn(policy, reference)), pair_sums(rewards.float().cpu().numpy(), logps.float().cpu().numpy())


class RewardModel(Pairs):
    """A one-output sequence classifier: the reward of a prompt and an answer (at the last token)."""

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = self.logits(model, batch).float().reshape(-1).chunk(2)
        return chosen, rejected

    def loss(self, model, batch, loss_fn):
        return loss_fn(*self.rewards(model, batch))

    def evaluate(self, model, batch, loss_fn):
        """Folded into the metrics' sums (train.metrics.pair_sums): the rewards of chosen and rejected (a reward
        model has no log-probabilities)."""
        chosen, rejected = self.rewards(model, batch)
        return float(loss_fn(chosen, rejected)), pair_sums(torch.stack([chosen, rejected], 1).cpu().numpy())


def hooks_class(rank_hooks: str) -> type[TaskHooks]:
    """The class a registry entry names (a test checks every entry names one)."""
    found = globals().get(rank_hooks)
    if not (isinstance(found, type) and issubclass(found, TaskHooks)):
        raise LookupError(f"launcher.train.tasks has no task hooks class {rank_hooks!r}")
    return found


def hooks(recipe: Recipe, tokenizer) -> TaskHooks:
    """The rank-side hooks of the recipe's task type."""
    return hooks_class(recipe.task.spec.rank_hooks)(recipe, tokenizer)
