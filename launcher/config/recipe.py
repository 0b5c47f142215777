"""The recipe: what to train. Typed, documented, defaults in the schema.

Every field is validated here, once, before any process starts; the training
code reads typed attributes and never falls back to defaults of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from launcher.config.tasks import TASKS, TaskSpec

# the task types are the registry's (config.tasks); Literal[...] of its names keeps the schema's error messages
TaskType = Literal[tuple(TASKS)]  # type: ignore[valid-type]
Precision = Literal["fp32", "bf16", "fp16"]
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per value of each Precision


class Strict(BaseModel):
    # inf/nan are never a meaningful setting (lr: 1e999 reads as inf)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data):
        """YAML reads yes/no/on/off as booleans, and pydantic would take True as the number 1; an integer of
        40 digits would be taken as it is (a run of 10^40 steps) and overflow torch and numpy later."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None and bool not in _types_in(field.annotation):
                    raise ValueError(
                        f"{key}: expected a number or text, got the boolean {value!r} (YAML reads "
                        "yes/no/on/off/true/false as booleans)"
                    )
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                    raise ValueError(f"{key}: {value} is out of range (a setting here is a 64-bit integer)")
        return data


def _types_in(annotation) -> set:
    """The plain types an annotation admits (unions, Optional and Annotated unwrapped)."""
    if isinstance(annotation, type):
        return {annotation}
    found = set()
    for arg in getattr(annotation, "__args__", ()) or ():
        found |= _types_in(arg)
    return found


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

    @model_validator(mode="after")
    def _adapter_or_lora(self) -> ModelConfig:
        if self.adapter is not None and self.lora is not None:
            raise ValueError("model.adapter loads a trained adapter and model.lora adds new ones: give one of them")
        return self


# ----------------------------------------------------------------------------- losses
class CrossEntropy(Strict):
    name: Literal["cross_entropy"]
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: list[Annotated[float, Field(gt=0)]] | Literal["auto"] | None = Field(
        None, description="Per-class weights, or 'auto' for inverse label frequency in the training split."
    )


class Focal(Strict):
    name: Literal["focal"]
    gamma: float = Field(2.0, ge=0.0, description="Focusing parameter; 0 is plain cross-entropy.")
    alpha: float | None = Field(None, gt=0.0, lt=1.0, description="Weight of the positive class (binary/multi-label).")


class BCE(Strict):
    name: Literal["bce"]
    pos_weight: float | list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Weight of positives, one number or one per label."
    )


class MSE(Strict):
    name: Literal["mse"]


class MAE(Strict):
    name: Literal["mae"]


class Huber(Strict):
    name: Literal["huber"]
    delta: float = Field(1.0, gt=0.0)


LossConfig = Annotated[CrossEntropy | Focal | BCE | MSE | MAE | Huber, Field(discriminator="name")]

# loss name → its config class: the union above, by name (the default loss of a task is built from it)
LOSS_CONFIGS: dict[str, type[Strict]] = {
    cls.model_fields["name"].annotation.__args__[0]: cls for cls in (CrossEntropy, Focal, BCE, MSE, MAE, Huber)
}


class TaskConfig(Strict):
    type: TaskType
    num_labels: int | None = Field(None, ge=1, description="Number of classes; derived from `labels` when given.")
    labels: list[str] | None = Field(
        None, description="Class names in index order. Labels in the data may be these names or their indices."
    )
    loss: LossConfig | None = Field(None, description="Loss from the registry; a sensible one per task when omitted.")
    metrics: list[str] | None = Field(None, description="Metrics from the registry; defaults per task.")
    chat_template: bool = Field(
        False, description="Language-model prompt/response pairs: format with the tokenizer's chat template."
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
    def resolved_loss(self) -> CrossEntropy | Focal | BCE | MSE | MAE | Huber:
        if self.loss is not None:
            return self.loss
        name = self.spec.losses[0]
        return LOSS_CONFIGS[name](name=name)

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


class DataConfig(Strict):
    train: str = Field(description="Training file (.jsonl, .json, .csv, .tsv, .parquet) or a saved HF dataset folder.")
    validation: str | None = Field(None, description="Validation file; when absent, `split` carves it from train.")
    test: str | None = Field(None, description="Test file; when absent, `split` may carve it from train.")
    split: SplitRatios = Field(
        default_factory=SplitRatios,
        description="Seeded split of `train` for the splits that have no file of their own.",
    )
    text_field: str = Field("text", description="Text column (tagging tasks: a list of words).")
    text_pair_field: str | None = Field(None, description="Second text column for pair tasks (NLI, similarity).")
    label_field: str = Field("label", description="Label column (tagging tasks: a list of tags, one per word).")
    prompt_field: str | None = Field(None, description="SFT / sequence-to-sequence: the prompt (source) column.")
    response_field: str | None = Field(None, description="SFT / sequence-to-sequence: the response (target) column.")
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
        "error", description="Rows with an empty text or label: fail naming them, or drop them and say how many."
    )
    seed: int = Field(1234, description="Seed of the split and of each epoch's shuffle.")


# ----------------------------------------------------------------------------- train
class OptimizerConfig(Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)


class SchedulerConfig(Strict):
    name: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warm-up as a fraction of total steps.")


Tracker = Literal["tensorboard", "mlflow", "wandb"]


class WatchedMetric(Strict):
    metric: str = Field(
        description="A number the validation evaluation reports, as summary.json names it: 'loss', or a "
        "metric's key (accuracy, f1_macro, precision_macro, recall_macro, roc_auc, mae, rmse, perplexity)."
    )
    mode: Literal["min", "max"] = Field(description="'min' when lower is better (loss, mae, perplexity), else 'max'.")


class EarlyStopping(WatchedMetric):
    patience: int = Field(3, ge=1, description="Validation evaluations without an improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="An improvement smaller than this does not count.")


class TrainConfig(Strict):
    batch_size: int = Field(32, ge=1, description="GLOBAL batch per optimizer step, across all ranks and accumulation.")
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Per-device batch per forward pass; when omitted, batch_size / world_size (no accumulation).",
    )
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(
        None,
        ge=0,
        description="Stop after this many optimizer steps (overrides epochs); 0 evaluates the model without "
        "training it (what `launch eval` sets).",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max global gradient norm; null disables clipping.")
    precision: Precision = Field("fp32", description="Mixed-precision autocast of the forward pass.")
    eval_every: int | Literal["epoch"] | None = Field(
        "epoch", description="Evaluate on validation every N steps, every epoch, or only at the end (null)."
    )
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (and always at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; the newest complete one is never removed.")
    checkpoint_hash: bool = Field(
        False,
        description="Also record each checkpoint file's SHA-256 in its manifest "
        "(sizes always are, which catches truncated and missing files) and verify it before "
        "resume. Off by default: rank 0 reads the whole checkpoint back at every save, "
        "minutes for multi-GB shards; turn it on for small models or untrusted storage.",
    )
    log_every: int = Field(10, ge=1, description="Steps between metric lines in metrics.jsonl and the log.")
    seed: int = Field(42)
    resume: str = Field("auto", description="'auto' (newest checkpoint in output_dir), 'never', or a checkpoint path.")
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers that get the metrics, the recipe, the plan and the launch's facts: "
        "tensorboard (output_dir/tensorboard), mlflow (MLFLOW_TRACKING_URI), wandb (WANDB_MODE, WANDB_PROJECT). "
        "One output_dir is one tracker run, continued on resume.",
    )
    tracker_project: str | None = Field(
        None,
        description="MLflow experiment / W&B project; default: MLFLOW_EXPERIMENT_NAME or WANDB_PROJECT, "
        "else 'launcher'.",
    )
    tensorboard: bool = Field(False, description="Deprecated: write report_to: [tensorboard].")
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop every rank once a validation metric stops improving (needs a validation split)."
    )
    keep_best: WatchedMetric | None = Field(
        None,
        description="Keep the checkpoint with the best validation metric beside keep_last (never pruned); a "
        "new best is saved at the step it is found.",
    )
    final: Literal["last", "best"] = Field(
        "last", description="What final/ holds and the test split scores: the last step's model or the best's."
    )

    @model_validator(mode="after")
    def _eval_every(self) -> TrainConfig:
        if isinstance(self.eval_every, int) and self.eval_every < 1:
            raise ValueError("eval_every must be >= 1, 'epoch' or null")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError("report_to: each tracker once")
        if self.final == "best" and self.keep_best is None:
            raise ValueError("final: best needs keep_best: {metric, mode} (which checkpoint is best)")
        return self

    @property
    def trackers(self) -> list[str]:
        """report_to, with the deprecated `tensorboard: true` folded in."""
        return self.report_to + (["tensorboard"] if self.tensorboard and "tensorboard" not in self.report_to else [])


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
        if bool(self.data.prompt_field) != bool(self.data.response_field):
            problems.insert(min(1, len(problems)), "data.prompt_field and data.response_field go together")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)
