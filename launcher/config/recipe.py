"""The recipe: what to train. Typed, documented, defaults in the schema. The model, task, data, distributed and
preflight sections are here; a task's loss is in config/losses.py, the train section in config/training.py.

Every field is validated here, once, before any process starts; the training
code reads typed attributes and never falls back to defaults of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from launcher.config.losses import LOSS_CONFIGS, Loss, LossConfig
from launcher.config.strict import Strict
from launcher.config.tasks import TASKS, TaskSpec
from launcher.config.training import Precision, TrainConfig

# the task types are the registry's (config.tasks); Literal[...] of its names keeps the schema's error messages
TaskType = Literal[tuple(TASKS)]  # type: ignore[valid-type]


# ----------------------------------------------------------------------------- model
class LoraConfig(Strict):
    r: int = Field(8, ge=1, description="Rank of the adapters.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (or suffixes) that get adapters, or every linear layer but the head."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] | Literal["auto"] = Field(
        "auto", description="Modules trained in full and saved with the adapter; 'auto' = the task head."
    )


class QuantizationConfig(Strict):
    bits: Literal[4, 8] = Field(description="8-bit (LLM.int8) or 4-bit (QLoRA) base weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="4-bit: quantize the quantization constants too.")
    compute_dtype: Precision = Field("bf16", description="4-bit: dtype of the matmuls.")


class ModelConfig(Strict):
    path: str = Field(
        description="A local folder, a hub id, or 'pkg:PACKAGE/SUBFOLDER' for a model folder "
        "shipped inside an installed Python package (found without importing the package)."
    )
    dtype: Precision = Field("fp32", description="dtype the weights are loaded in.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub id.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder.")
    lora: LoraConfig | None = Field(None, description="Train low-rank adapters (PEFT) instead of all weights.")
    adapter: str | None = Field(
        None,
        description="A trained LoRA adapter folder (adapter_config.json, e.g. a LoRA run's final/) loaded onto "
        "model.path; what `launch eval RECIPE --model ADAPTER_DIR` sets.",
    )
    quantization: QuantizationConfig | None = Field(
        None, description="Load the frozen base in 8 or 4 bits (bitsandbytes); needs `lora` (QLoRA)."
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="Attention kernel: sdpa (torch's scaled_dot_product_attention), flash_attention_2 (a CUDA GPU "
        "and the flash-attn package; packed sequences run as varlen attention), or eager (plain matmuls).",
    )

    @model_validator(mode="after")
    def _adapter_or_lora(self) -> ModelConfig:
        if self.adapter is not None and self.lora is not None:
            raise ValueError("model.adapter loads a trained adapter and model.lora adds new ones: give one of them")
        return self


class TaskConfig(Strict):
    type: TaskType
    num_labels: int | None = Field(None, ge=1, description="Number of classes; derived from `labels` when given.")
    labels: list[str] | None = Field(
        None, description="Class names in index order. Labels in the data may be these names or their indices."
    )
    loss: LossConfig | None = Field(None, description="Loss from the registry; a sensible one per task when omitted.")
    metrics: list[str] | None = Field(None, description="Metrics from the registry; defaults per task.")
    chat_template: bool = Field(
        False,
        description="Prompt/response (causal_lm) or text prompt/chosen/rejected (preference, reward_model) "
        "columns: format them as a user and an assistant turn with the chat template.",
    )
    chat_template_file: str | None = Field(
        None,
        description="A Jinja chat template file used instead of the tokenizer's (chat, preference, reward_model); "
        "the exported tokenizer carries it.",
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="chat: the loss on every assistant turn, or on the last one only."
    )
    end_of_turn: str | None = Field(
        None,
        description="The token that closes an assistant turn in the template (Gemma: <end_of_turn>); every "
        "supervised turn must end with it, so the model learns to stop. Default: the tokenizer's EOS token.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        errors = []
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                errors.append("labels: names must be unique")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                errors.append(f"num_labels is {self.num_labels} but labels names {len(self.labels)} classes")
        spec = self.spec
        if spec.needs_classes and self.labels is None and self.num_labels is None:
            errors.append(f"task type {self.type!r} needs num_labels or labels")
        elif spec.label in ("class", "tags") and self.resolved_num_labels < 2:
            errors.append(
                f"task type {self.type!r} with {self.resolved_num_labels} class: a softmax over one class is "
                "always 1, so the loss is 0 and accuracy 1.0 whatever the model does; give at least 2 classes "
                "(a score to predict is task type 'regression')"
            )
        if self.loss is not None and self.loss.name not in spec.losses:
            valid = ", ".join(sorted(spec.losses))
            errors.append(f"loss {self.loss.name!r} does not fit task {self.type!r}; valid: {valid}")
        classes = self.resolved_num_labels
        weights = getattr(self.loss, "class_weights", None)
        if isinstance(weights, list) and len(weights) != classes:
            errors.append(f"loss.class_weights has {len(weights)} values for {classes} classes")
        pos_weight = getattr(self.loss, "pos_weight", None)
        if isinstance(pos_weight, list) and len(pos_weight) != classes:
            errors.append(f"loss.pos_weight has {len(pos_weight)} values for {classes} labels")
        if getattr(self.loss, "alpha", None) is not None and spec.label != "multi_hot" and classes != 2:
            errors.append("focal alpha weighs the positive class: it needs 2 classes or multi_label_classification")
        for metric in self.metrics or []:
            if metric not in spec.metrics:
                valid = ", ".join(sorted(spec.metrics))
                errors.append(f"metric {metric!r} does not fit task {self.type!r}; valid: {valid}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def resolved_num_labels(self) -> int:
        if self.labels is not None:
            return len(self.labels)
        if self.num_labels is not None:
            return self.num_labels
        return 1

    @property
    def resolved_loss(self) -> Loss:
        if self.loss is not None:
            return self.loss
        name = self.spec.losses[0]
        return LOSS_CONFIGS[name](name=name)

    @property
    def uses_reference(self) -> bool:
        """The loss needs the reference model's log-probabilities (and, without LoRA, a frozen copy)."""
        return self.resolved_loss.uses_reference

    @property
    def resolved_metrics(self) -> list[str]:
        return list(self.metrics) if self.metrics is not None else list(self.spec.default_metrics)

    @property
    def spec(self) -> TaskSpec:
        """This task type's entry in the task registry (config.tasks)."""
        return TASKS[self.type]


# ----------------------------------------------------------------------------- data
class SplitRatios(Strict):
    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitRatios:
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave rows for training (sum < 1)")
        return self


HUB_PREFIX = "hub:"  # a data source named `hub:NAME` is a Hugging Face Hub dataset (or a local clone of its repository)


def is_url(path: str) -> bool:
    """An fsspec URL (s3://, gs://, https://, file://, ...) rather than a local path."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.replace("+", "").replace("-", "").isalnum()


class SourceConfig(Strict):
    """One data source: a file, folder, glob, URL or Hub dataset, with its share of a mixture."""

    path: str = Field(
        min_length=1,
        description="A file (.jsonl .json .csv .tsv .parquet, optionally compressed .gz .bz2 .xz .zst), a folder "
        "(of such files, or written by datasets' save_to_disk), a glob ('data/part-*.jsonl'), an fsspec URL "
        "(s3://, gs://, https://, file://; credentials come from the environment only), or 'hub:NAME' for a "
        "Hugging Face Hub dataset (or a local clone of a dataset repository), read through datasets.load_dataset.",
    )
    split: str | None = Field(None, description="hub: the dataset's split (default: train, validation or test).")
    subset: str | None = Field(None, description="hub: the dataset's configuration (subset) name.")
    revision: str | None = Field(None, description="hub: branch, tag or commit of the dataset repository.")
    weight: float | None = Field(
        None,
        gt=0,
        description="In a list of training sources: this source's share of every epoch, relative to the others' "
        "(by rows or by tokens: data.mix_by). Without weights, an epoch is every row of every source once.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SourceConfig:
        path = self.path
        if is_url(path) and "@" in path.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                f"{path.split('://', 1)[0]}:// URL holds credentials; give them in the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...), never in the recipe"
            )
        if not path.startswith(HUB_PREFIX):
            given = [name for name in ("split", "subset", "revision") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply to hub: sources only (path is {path!r})")
        elif not path[len(HUB_PREFIX) :].strip():
            raise ValueError("hub: needs a dataset name, e.g. hub:org/name")
        return self

    @property
    def is_hub(self) -> bool:
        return self.path.startswith(HUB_PREFIX)

    @property
    def label(self) -> str:
        """How messages name this source: the path as written (with the hub split and subset)."""
        extra = [f"{k} {getattr(self, k)}" for k in ("subset", "split", "revision") if getattr(self, k) is not None]
        return self.path + (f" ({', '.join(extra)})" if extra else "")


def _as_source(value):
    """A source as the recipe may write it (a path, a mapping) → what SourceConfig validates."""
    if isinstance(value, str):
        return {"path": value}
    if isinstance(value, (dict, SourceConfig)):
        return value
    raise ValueError(
        f"expected a path, URL or hub:NAME, or a mapping with `path` (and weight, split, subset, revision); "
        f"got {value!r}"
    )


class DataConfig(Strict):
    train: Annotated[list[SourceConfig], Field(min_length=1)] = Field(
        description="Training data: one source (a file, folder, glob, URL or hub:NAME; see SourceConfig.path), or a "
        "list of sources, each with an optional `weight` (a mixture)."
    )
    validation: SourceConfig | None = Field(
        None, description="Validation source; when absent, `split` carves it from train."
    )
    test: SourceConfig | None = Field(None, description="Test source; when absent, `split` may carve it from train.")

    @field_validator("train", mode="before")
    @classmethod
    def _train_sources(cls, value):
        return [_as_source(v) for v in value] if isinstance(value, list) else [_as_source(value)]

    @field_validator("validation", "test", mode="before")
    @classmethod
    def _split_source(cls, value):
        return None if value is None else _as_source(value)

    split: SplitRatios = Field(
        default_factory=SplitRatios,
        description="Seeded split of `train` for the splits that have no source of their own (of each training "
        "source, in a mixture).",
    )
    text_field: str = Field("text", description="Text column (tagging tasks: a list of words).")
    text_pair_field: str | None = Field(None, description="Second text column for pair tasks (NLI, similarity).")
    label_field: str = Field("label", description="Label column (tagging tasks: a list of tags, one per word).")
    prompt_field: str | None = Field(
        None, description="SFT / sequence-to-sequence: the prompt (source) column; preference pairs: 'prompt' if unset."
    )
    response_field: str | None = Field(None, description="SFT / sequence-to-sequence: the response (target) column.")
    messages_field: str = Field("messages", description="chat: the column of conversations (lists of messages).")
    chosen_field: str = Field("chosen", description="preference / reward_model: the preferred answer's column.")
    rejected_field: str = Field("rejected", description="preference / reward_model: the other answer's column.")
    csv_delimiter: str | None = Field(None, description="CSV delimiter; ',' for .csv and tab for .tsv when omitted.")
    csv_header: bool = Field(
        True, description="Whether a CSV file has a header row (without one, name columns with csv_columns)."
    )
    csv_columns: list[str] | None = Field(None, description="Column names for a CSV file without a header.")
    max_length: int = Field(128, ge=8, description="Tokens per example after truncation.")
    balance: bool = Field(
        False,
        description="Single-label classification: draw each epoch so every class is seen equally often "
        "(a weighted sampler, with replacement), for imbalanced data.",
    )
    on_missing: Literal["error", "drop"] = Field(
        "error",
        description="Rows with an empty text or label, or a conversation or pair with no answer token left "
        "within max_length: fail naming them, or drop them and say how many.",
    )
    seed: int = Field(1234, description="Seed of the split and of each epoch's shuffle.")
    packing: Literal["none", "pack", "padding_free"] = Field(
        "none",
        description="Causal LM: 'pack' places rows into bins of max_length tokens (best-fit decreasing; "
        "train.batch_size then counts bins), 'padding_free' concatenates each micro-batch into one row; both restart "
        "position_ids per sequence and never attend across a sequence boundary. 'none' pads to the longest row.",
    )
    group_by_length: bool = Field(
        False,
        description="Classification and tagging: batches of rows of similar length (less padding), "
        "seeded per epoch like the shuffle.",
    )
    mix_by: Literal["rows", "tokens"] = Field(
        "rows",
        description="What the weights of a list of training sources share out: rows (samples) or tokens (a "
        "source of long rows then gets fewer of them).",
    )
    streaming: bool = Field(
        False,
        description="Read the training data as it trains, tokenizing each global batch on the ranks, for data "
        "larger than the disk; needs train.max_steps (the number of rows is not known ahead) and a validation "
        "source of its own. Resume is exact at any world size (by sample position).",
    )
    shuffle_buffer: int = Field(
        10_000, ge=1, description="data.streaming: rows in the seeded shuffle buffer of each source (1: file order)."
    )
    cache_dir: str | None = Field(
        None,
        description="Folder of the tokenized cache (default: $LAUNCHER_CACHE_DIR, else ~/.cache/launcher). On a "
        "folder every node sees, one process tokenizes and the others wait for its file.",
    )
    num_proc: int | None = Field(
        None, ge=1, description="Processes that tokenize (default: one per CPU for large data, else one)."
    )
    prepare: Literal["before_ranks", "only"] = Field(
        "before_ranks",
        description="'before_ranks': tokenize into the cache before any rank starts (when not cached yet); "
        "'only': tokenize and stop, start no rank (what `launch prepare` sets).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        errors = []
        sources = self.train
        weighted = [s.weight is not None for s in sources]
        if any(weighted) and not all(weighted):
            errors.append("train: give every source a weight, or none (then every row is used once per epoch)")
        for split in ("validation", "test"):
            value = getattr(self, split)
            if value is not None and value.weight is not None:
                errors.append(f"{split}: weight applies to the training sources only")
        if self.csv_columns is not None:
            twice = sorted({c for c in self.csv_columns if self.csv_columns.count(c) > 1})
            if twice:
                errors.append(f"csv_columns: column names must be unique ({', '.join(map(repr, twice))} twice)")
        if self.streaming:
            carved = [s for s in ("validation", "test") if getattr(self, s) is None and getattr(self.split, s) > 0]
            if carved:
                errors.append(
                    f"streaming reads train as it trains, so no {'/'.join(carved)} split can be carved from it: "
                    f"give data.{carved[0]} a source of its own, or set data.split.{carved[0]}=0"
                )
            if self.mix_by == "tokens" and len(sources) > 1:
                errors.append("streaming mixes sources by rows: token counts are not known before training")
            if self.balance:
                errors.append("balance draws from the whole training set; it cannot be combined with streaming")
        if self.balance and len(sources) > 1:
            errors.append("balance and a list of training sources both set each epoch's draw; use one of them")
        if self.packing == "pack" or self.group_by_length:
            setting = "packing: pack" if self.packing == "pack" else "group_by_length"
            if self.streaming:
                errors.append(
                    f"{setting} orders the whole tokenized training split, which streaming never holds; "
                    "use packing: padding_free with streaming"
                )
            elif any(weighted):
                errors.append(f"{setting} and weighted training sources both set each epoch's draw; use one of them")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def weighted(self) -> bool:
        """A mixture: the training sources carry weights."""
        return any(s.weight is not None for s in self.train)


Strategy = Literal["ddp", "zero1", "zero2", "zero3", "fsdp", "auto"]


class DistributedConfig(Strict):
    strategy: Strategy = Field(
        "ddp",
        description="How ranks share the model: ddp replicates it; zero1/2/3 shard optimizer states, "
        "+gradients, +parameters (DeepSpeed); fsdp shards all three (torch FSDP2); auto picks the fastest that fits.",
    )
    offload: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where optimizer states live (ZeRO; fsdp supports cpu)."
    )
    offload_parameters: bool = Field(False, description="zero3/fsdp: offload the parameters as well (to `offload`).")
    nvme_path: str | None = Field(None, description="offload: nvme: a fast local folder on every node.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    deepspeed_config: str | None = Field(
        None, description="A DeepSpeed JSON to use instead of the generated one; validated against the plan."
    )
    hang_timeout: float | None = Field(
        300,
        ge=0,
        description="Seconds a rank may go without progress (a phase change: data, forward, backward, "
        "optimizer, eval, save) before the watchdog dumps every rank's stack, stops the run and names the stuck "
        "rank; 0 or null turns it off. Must exceed the longest single phase (a checkpoint write, an evaluation).",
    )
    collective_timeout: float = Field(
        600,
        gt=0,
        description="Seconds a collective (all-reduce, broadcast, barrier) may wait for its peers before it "
        "fails (the process group's timeout; NCCL's own default is 30 minutes). Must exceed the longest work one "
        "rank does alone between two collectives, such as rank 0 writing a checkpoint or exporting the model.",
    )

    straggler_factor: float = Field(
        1.5,
        gt=1.0,
        description="A rank whose median time alone at the start of a step (before its first forward: waiting "
        "for and preparing its batch) exceeds this factor times the median over ranks is named a straggler (log, "
        "metrics.jsonl, summary.json).",
    )

    @model_validator(mode="after")
    def _watchdog_first(self) -> DistributedConfig:
        if self.hang_timeout and self.hang_timeout >= self.collective_timeout:
            raise ValueError(
                f"hang_timeout ({self.hang_timeout:g} s) must be below collective_timeout "
                f"({self.collective_timeout:g} s), or the collective fails first and the watchdog never "
                "dumps the stacks or names the stuck rank; lower hang_timeout (0 turns it off)"
            )
        return self


# "80GiB", "512MiB", "141GB" (launcher.config.cluster.parse_bytes reads it); also used by the cluster profiles
MemorySize = Annotated[str, Field(pattern=r"^\s*[0-9]*\.?[0-9]+\s*([KMGT]i?B|[kmgt]i?b|B|b)?\s*$")]


class PreflightConfig(Strict):
    """Checks run on every rank after the process group is up and before the model or data is loaded
    (launcher/train/preflight.py): versions agree, all-reduce bandwidth per node pair, output_dir shared by
    every node, free host RAM and disk against the planner's needs. `launch preflight RECIPE` runs them alone."""

    run: Literal["before_training", "only", "never"] = Field(
        "before_training",
        description="'before_training' (default, about a second on CPU); 'only': the ranks "
        "run the checks and exit (what `launch preflight` sets); 'never' skips them.",
    )
    allreduce_size: MemorySize | None = Field(
        None, description="Tensor all-reduced to measure bandwidth, e.g. 256MiB; default 64MiB on GPU, 4MiB on CPU."
    )
    slow_node_factor: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="A node whose node-pair bandwidth is below this fraction of the median "
        "over all pairs fails the check (it needs 3 or more nodes to have a median to compare with).",
    )


class Recipe(Strict):
    model: ModelConfig
    task: TaskConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    preflight: PreflightConfig = Field(default_factory=PreflightConfig)
    output_dir: str = Field(description="Run directory: checkpoints, metrics.jsonl, final/, summary.json.")

    @model_validator(mode="after")
    def _fields_fit_task(self) -> Recipe:
        problems = self.task.spec.recipe_problems(self)
        if bool(self.data.prompt_field) != bool(self.data.response_field) and self.task.spec.rows == "plain":
            problems.insert(min(1, len(problems)), "data.prompt_field and data.response_field go together")
        if self.data.streaming and getattr(self.task.loss, "class_weights", None) == "auto":
            problems.append(
                "task.loss.class_weights: auto counts the training labels before training, which data.streaming "
                "does not read ahead; give the weights as a list"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)
