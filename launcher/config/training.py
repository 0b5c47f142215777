"""The train section of a recipe (`train:`): batch, length, optimizer and schedule, precision, evaluation,
checkpoints and their retention, resume, trackers, early stopping and the best checkpoint, the compile and
loss-kernel settings; and the precisions it and `model.dtype` name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from launcher.config.strict import Strict

Precision = Literal["fp32", "bf16", "fp16"]
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per value of each Precision


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
    checkpoint_async: bool = Field(
        True,
        description="fsdp: write each checkpoint in the background (torch DCP async_save): the loop goes on once "
        "the shards are copied to host memory (one more copy of this rank's states in RAM), and the folder is "
        "renamed into place once every rank's files are written. DDP and ZeRO save synchronously.",
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
    compile: bool = Field(
        False,
        description="torch.compile each transformer block (regional compilation: one graph per block type, "
        "compiled once); on CPU it needs a C++ compiler (inductor).",
    )
    lm_loss: Literal["auto", "full", "chunked", "liger"] = Field(
        "auto",
        description="Causal LM loss: 'chunked' runs the LM head and cross-entropy over lm_loss_chunk tokens at a "
        "time on the trained positions only, never holding the [batch, seq, vocab] logits; 'liger' is Liger's fused "
        "linear cross-entropy (a CUDA GPU, liger-kernel installed); 'full' computes all logits; 'auto' is chunked "
        "where the strategy and model allow it, else full.",
    )
    lm_loss_chunk: int = Field(1024, ge=16, description="Tokens per chunk of the chunked causal-LM loss.")

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
