"""Model and tokenizer: load pretrained weights with the task's head.

The seam for later stages (quantization, LoRA) is `build`: each stage takes
the model the previous one returned.
"""
from __future__ import annotations

import torch

from launcher.checks import resolve_model_path
from launcher.recipe import Recipe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _auto_class(task: str):
    import transformers as tf

    return {
        "sequence_classification": tf.AutoModelForSequenceClassification,
        "multi_label_classification": tf.AutoModelForSequenceClassification,
        "regression": tf.AutoModelForSequenceClassification,
        "token_classification": tf.AutoModelForTokenClassification,
        "causal_lm": tf.AutoModelForCausalLM,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
    }[task]


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    path = resolve_model_path(recipe.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=recipe.model.revision,
                                              trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models ship without a pad token
    return tokenizer


def build(recipe: Recipe, tokenizer) -> torch.nn.Module:
    task = recipe.task
    kwargs: dict = {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code,
                    "dtype": DTYPES[recipe.model.dtype]}
    if task.type in ("sequence_classification", "multi_label_classification", "token_classification", "regression"):
        kwargs["num_labels"] = task.resolved_num_labels
        kwargs["problem_type"] = {"multi_label_classification": "multi_label_classification",
                                  "regression": "regression"}.get(task.type, "single_label_classification")
        if task.labels:
            kwargs["id2label"] = dict(enumerate(task.labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(task.labels)}
    model = _auto_class(task.type).from_pretrained(resolve_model_path(recipe.model.path), **kwargs)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task == "seq2seq":
        inner = getattr(model, "module", model)
        labels = batch["labels"]
        inputs["decoder_input_ids"] = inner.prepare_decoder_input_ids_from_labels(labels=labels)
    return model(**inputs).logits
