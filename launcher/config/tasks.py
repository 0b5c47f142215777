"""The task registry: everything that varies by task type, one entry per type, registered once.

A `TaskSpec` is the torch-free half the schema, the checks and the planner read: which Hugging Face auto
class and PEFT task type the model gets, whether its head is a pretrained language-model head, what a row's
label is and which columns a row needs, the losses and metrics that fit, and the settings the task ignores.
Its rank-side half (tokenize a row, collate the labels, the model's inputs, what evaluation keeps) is the
class `launcher.train.tasks.<rank_hooks>`, found by name so that this module stays torch-free.

Adding a task type is an entry in TASKS, its hooks class in launcher/train/tasks.py and a test
(docs/extending.md). No other module names a task type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What one row's label is, after the data checks map it (launcher.planning.data_files):
#   class      one class index, from a class name or an index        (sequence classification)
#   multi_hot  a 0/1 vector over the classes, from a list or "a,b"   (multi-label classification)
#   number     a float                                               (regression)
#   tags       one class index per word of a list-of-words text       (token classification)
#   none       no label column: the text (or response) is the target (language modelling), or the row is a
#              conversation or a preference pair (its `rows` kind says which)
LabelKind = Literal["class", "multi_hot", "number", "tags", "none"]
# What a row holds beyond the plain text columns (launcher.planning.conversations checks both before launch):
#   plain         text (and text pair), or prompt/response
#   conversation  a `messages` list in the OpenAI format (system, user, assistant and tool turns)
#   pair          prompt/chosen/rejected, each a text or a list of messages
RowKind = Literal["plain", "conversation", "pair"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    auto_class: str  # transformers' Auto* class that adds the task's head
    peft_task_type: str  # peft.TaskType name for LoRA
    rank_hooks: str  # class name in launcher.train.tasks: tokenize, collate, model inputs, evaluation outputs
    label: LabelKind
    losses: tuple[str, ...]  # loss names (config.recipe's loss registry) that fit; the first is the default
    metrics: tuple[str, ...]  # metric names that fit
    default_metrics: tuple[str, ...]
    # the output head is a pretrained language-model head (so LoRA trains no head in full, the planner counts
    # [batch, seq, vocab] logits), not a freshly initialised classifier
    language_model: bool = False
    next_token: bool = False  # the loss at position t scores token t+1 (labels are shifted by one)
    # transformers' config.problem_type for a classifier head (None: no num_labels / id2label for the model)
    hf_problem_type: str | None = None
    words: bool = False  # the text column holds a list of words (one label per word)
    prompt_response: Literal["required", "optional", "unused"] = "unused"  # data.prompt_field / response_field
    text_pair: bool = False  # data.text_pair_field feeds the model a second text
    chat_template: bool = False  # task.chat_template formats prompt/response (or text preference) pairs
    balance: bool = False  # data.balance (a class-balanced sampler) applies
    rows: RowKind = "plain"
    # the model runs on this many sequences per row (a pair: chosen and rejected); the planner's activations
    sequences_per_row: int = 1
    # the loss may compare with a frozen reference model: LoRA's base with the adapter disabled, or (full
    # fine-tuning) a frozen copy the planner counts; only for losses whose config says uses_reference
    reference_model: bool = False

    @property
    def renders_chats(self) -> bool:
        """Rows may be conversations rendered with a chat template (task.train_on, chat_template_file, end_of_turn)."""
        return self.rows != "plain"

    # data.packing applies: rows concatenated with per-sequence position_ids and block-diagonal attention (decoder
    # models; an encoder-decoder's cross-attention would need per-sequence masks of its own, so seq2seq has none)
    packing: bool = False
    length_grouping: bool = False  # data.group_by_length applies (one padded row per example)

    @property
    def needs_classes(self) -> bool:
        """num_labels or labels is required, and labels may be class names."""
        return self.label in ("class", "multi_hot", "tags")

    def columns(self, data) -> dict[str, str]:
        """Row field → data column, for `data` (a config.recipe.DataConfig)."""
        if self.rows == "conversation":
            return {"messages": data.messages_field}
        if self.rows == "pair":
            return {
                "prompt": data.prompt_field or "prompt",
                "chosen": data.chosen_field,
                "rejected": data.rejected_field,
            }
        if self.prompt_response == "required" or (self.prompt_response == "optional" and data.prompt_field):
            columns = {"prompt": data.prompt_field, "response": data.response_field}
        else:
            columns = {"text": data.text_field}
            if data.text_pair_field:
                columns["text_pair"] = data.text_pair_field
        if self.label != "none":
            columns["label"] = data.label_field
        return columns

    def ignored_settings(self, recipe) -> list[str]:
        """Settings of `recipe` that are valid but have no effect for this task (warned about, not dropped)."""
        task, data, notes = recipe.task, recipe.data, []
        if not self.needs_classes and (task.labels or task.num_labels):
            notes.append(f"task.labels/num_labels are ignored for {self.name}")
        if task.chat_template and not self.chat_template:
            notes.append(f"task.chat_template is ignored for {self.name}")
        if data.text_pair_field and not self.text_pair:
            notes.append(f"data.text_pair_field is ignored for {self.name}")
        if data.prompt_field and self.prompt_response == "unused" and self.rows != "pair":
            notes.append(f"data.prompt_field/response_field are ignored for {self.name}")
        if self.rows != "conversation" and "train_on" in task.model_fields_set:
            notes.append(f"task.train_on is ignored for {self.name} (it picks the assistant turns of a conversation)")
        if not self.renders_chats and (task.chat_template_file or task.end_of_turn):
            notes.append(f"task.chat_template_file/end_of_turn are ignored for {self.name}")
        if recipe.train.lm_loss != "auto" and not self.next_token:
            notes.append(f"train.lm_loss is ignored for {self.name} (its loss is not a next-token loss)")
        return notes

    def recipe_problems(self, recipe) -> list[str]:
        """What this task needs of the recipe beyond each field's own schema (one message each)."""
        data, problems = recipe.data, []
        if self.prompt_response == "required" and not (data.prompt_field and data.response_field):
            problems.append(f"{self.name} needs data.prompt_field (source) and data.response_field (target)")
        if data.balance and not self.balance:
            problems.append(f"data.balance needs single-label classes; task {self.name!r} has none to balance")
        if recipe.task.chat_template and self.chat_template and self.rows == "plain" and not data.prompt_field:
            problems.append("task.chat_template needs data.prompt_field and data.response_field")
        if data.response_field and self.rows == "pair":
            problems.append(f"{self.name} reads data.chosen_field and data.rejected_field, not data.response_field")
        if data.packing != "none" and not self.packing:
            problems.append(
                f"data.packing {data.packing!r} needs a decoder-only language model (task causal_lm); task "
                f"{self.name!r} has {'an encoder-decoder' if self.language_model else 'one padded row per example'}"
                + ("; use data.group_by_length to cut padding" if self.length_grouping else "")
            )
        if data.group_by_length and not self.length_grouping:
            problems.append(
                f"data.group_by_length is for classification and tagging tasks; task {self.name!r} has none"
                + ("; use data.packing" if self.packing else "")
            )
        return problems


CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1", "per_class", "roc_auc")
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "logps")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="sequence_classification",
            summary="one class per text (or text pair)",
            auto_class="AutoModelForSequenceClassification",
            peft_task_type="SEQ_CLS",
            rank_hooks="SequenceClassification",
            label="class",
            losses=("cross_entropy", "focal"),
            metrics=CLASSIFICATION_METRICS,
            default_metrics=("accuracy", "f1"),
            hf_problem_type="single_label_classification",
            text_pair=True,
            balance=True,
            length_grouping=True,
        ),
        TaskSpec(
            name="multi_label_classification",
            summary="any number of classes per text",
            auto_class="AutoModelForSequenceClassification",
            peft_task_type="SEQ_CLS",
            rank_hooks="MultiLabelClassification",
            label="multi_hot",
            losses=("bce", "focal"),
            metrics=CLASSIFICATION_METRICS,
            default_metrics=("accuracy", "f1"),
            hf_problem_type="multi_label_classification",
            text_pair=True,
            length_grouping=True,
        ),
        TaskSpec(
            name="regression",
            summary="one number per text",
            auto_class="AutoModelForSequenceClassification",
            peft_task_type="SEQ_CLS",
            rank_hooks="Regression",
            label="number",
            losses=("mse", "mae", "huber"),
            metrics=("mae", "rmse"),
            default_metrics=("mae", "rmse"),
            hf_problem_type="regression",
            text_pair=True,
            length_grouping=True,
        ),
        TaskSpec(
            name="token_classification",
            summary="one tag per word (NER, POS)",
            auto_class="AutoModelForTokenClassification",
            peft_task_type="TOKEN_CLS",
            rank_hooks="TokenClassification",
            label="tags",
            losses=("cross_entropy", "focal"),
            metrics=("accuracy", "precision", "recall", "f1", "per_class"),
            default_metrics=("accuracy", "f1"),
            hf_problem_type="single_label_classification",
            words=True,
            length_grouping=True,
        ),
        TaskSpec(
            name="causal_lm",
            summary="next-token prediction on text, or SFT on prompt/response pairs (prompt masked)",
            auto_class="AutoModelForCausalLM",
            peft_task_type="CAUSAL_LM",
            rank_hooks="CausalLM",
            label="none",
            losses=("cross_entropy",),
            metrics=("perplexity",),
            default_metrics=("perplexity",),
            language_model=True,
            next_token=True,
            prompt_response="optional",
            chat_template=True,
            packing=True,
        ),
        TaskSpec(
            name="seq2seq",
            summary="source → target text (encoder-decoder)",
            auto_class="AutoModelForSeq2SeqLM",
            peft_task_type="SEQ_2_SEQ_LM",
            rank_hooks="Seq2Seq",
            label="none",
            losses=("cross_entropy",),
            metrics=("perplexity",),
            default_metrics=("perplexity",),
            language_model=True,
            prompt_response="required",
        ),
        TaskSpec(
            name="chat",
            summary="multi-turn SFT on conversations (a messages column); loss on assistant tokens only",
            auto_class="AutoModelForCausalLM",
            peft_task_type="CAUSAL_LM",
            rank_hooks="ChatSFT",
            label="none",
            losses=("cross_entropy",),
            metrics=("perplexity",),
            default_metrics=("perplexity",),
            language_model=True,
            next_token=True,
            rows="conversation",
            packing=True,
        ),
        TaskSpec(
            name="preference",
            summary="preference tuning on prompt/chosen/rejected pairs (DPO, ORPO, SimPO)",
            auto_class="AutoModelForCausalLM",
            peft_task_type="CAUSAL_LM",
            rank_hooks="Preference",
            label="none",
            losses=("dpo", "orpo", "simpo"),
            metrics=PREFERENCE_METRICS,
            default_metrics=PREFERENCE_METRICS,
            language_model=True,
            chat_template=True,
            rows="pair",
            sequences_per_row=2,
            reference_model=True,
        ),
        TaskSpec(
            name="reward_model",
            summary="a one-output sequence classifier scoring responses, trained on chosen/rejected pairs",
            auto_class="AutoModelForSequenceClassification",
            peft_task_type="SEQ_CLS",
            rank_hooks="RewardModel",
            label="none",
            losses=("bradley_terry",),
            metrics=("pairwise_accuracy",),
            default_metrics=("pairwise_accuracy",),
            hf_problem_type="regression",  # one output: the reward
            chat_template=True,
            rows="pair",
            sequences_per_row=2,
        ),
    )
}


def task_spec(name: str) -> TaskSpec:
    return TASKS[name]
