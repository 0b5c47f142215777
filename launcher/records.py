"""The files a run leaves on disk, as typed records with a schema version, validated when read.

Written by the ranks, read by the launcher, the watchdog, `launch status`, later runs (resume) and users'
tools, so each has one definition here and no reader parses raw JSON with `.get`. Torch-free.

    summary.json                     Summary           end of a run (train.run)
    checkpoint-N/trainer_state.json  CheckpointState   where a checkpoint stands (train.checkpoint)
    .heartbeat/rank-R.json           Beat              each rank's step and phase (train.heartbeat, the watchdog)
    preflight.json                   PreflightReport   the pre-flight verdict (train.preflight)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A record file that is missing, unreadable, of another schema version, or not what it should hold."""


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    what: ClassVar[str] = "record"
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        """The record at `path`, validated; RecordError says what is wrong with the file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise RecordError(f"{path}: cannot read the {cls.what} ({exc})") from None
        if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
            raise RecordError(
                f"{path}: {cls.what} of schema version {data['schema_version']}, written by a newer "
                f"launcher (this one reads version {SCHEMA_VERSION}); upgrade launcher"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(map(str, first["loc"]))
            raise RecordError(f"{path}: not a valid {cls.what} ({where}: {first['msg']})") from None

    def write(self, path: Path) -> None:
        """Written to a temporary file, flushed to disk, then renamed over `path`: never seen half-written."""
        write_json_atomic(Path(path), self.model_dump(mode="json"))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- checkpoints
class CheckpointState(Record):
    """Where a checkpoint stands: the step it resumes at and what it must match to continue a recipe."""

    what: ClassVar[str] = "checkpoint state"
    step: int
    # None where a writer left them out; train.compatibility.check_compatible refuses a checkpoint without them
    world_size: int | None = None
    # train.compatibility.fingerprint: what a resume must match (model, task, classes, batch, data, max_length...)
    fingerprint: dict[str, Any] | None = None
    # train.compatibility.train_settings: the recipe's train section it was written under (may change on resume)
    settings: dict[str, Any] | None = None
    epoch: float | None = None
    samples_seen: int | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    plan: dict[str, Any] = Field(default_factory=dict)  # the plan it was written under (its strategy: the layout)
    tokens_seen: int | None = None  # non-padding input tokens trained on up to this step, over every rank
    selection: dict[str, Any] | None = None  # train.selection: the best checkpoint so far, early-stopping count
    stopped_early: bool = False  # early stopping ended the run here: a resume trains no further
    trackers: dict[str, str] = Field(default_factory=dict)  # tracker → its run id (train.trackers), reused on resume


# ----------------------------------------------------------------------------- heartbeats
HEARTBEAT_DIR = ".heartbeat"
DUMP_SIGNAL = signal.SIGUSR2  # the watchdog's request for a stack dump (USR1 is the stop request: train.stop)
# The phases of a run in the order a rank goes through them; a rank earlier in this order at the same step is behind.
PHASES = (
    "data",
    "forward",
    "backward",
    "optimizer",
    "eval",
    "save",
    "stop-sync",
    "final-save",
    "final-eval",
    "export",
    "done",
)


class Beat(Record):
    """A rank's last note: who it is, and the step and phase it entered at `time`."""

    what: ClassVar[str] = "heartbeat"
    rank: int
    local_rank: int
    host: str
    pid: int
    agent_pid: int  # the launcher process (torchrun's agent) that started this rank and watches it
    step: int
    phase: str
    time: float


def beat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank}.json"


def stack_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"stack-rank-{rank}.txt"


def read_beats(run_dir: Path, since: float) -> list[Beat]:
    """Every rank's last note written after `since` (older files are from an earlier launch)."""
    beats = []
    for path in (Path(run_dir) / HEARTBEAT_DIR).glob("rank-*.json"):
        try:
            beat = Beat.read(path)
        except RecordError:
            continue  # replaced between glob and read: the next poll sees the new one
        if beat.time >= since:
            beats.append(beat)
    return sorted(beats, key=lambda b: b.rank)


# ----------------------------------------------------------------------------- the summary
class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    time_to_first_step_s: float | None
    recipe_and_plan_s: float
    rank_start_s: float
    process_group_s: float
    preflight_s: float
    data_prep_s: float  # library set-up, tokenizer, data
    model_load_s: float
    first_step_s: float | None
    training_wall_s: float
    training_cpu_s: float  # this rank's CPU time: robust to a busy machine
    samples_per_s: float | None
    # seconds each checkpoint save held this rank's loop: the whole save, or for a background write (fsdp) the
    # copy of the states to host memory and any wait for the write before it; the last also waits for its own
    checkpoint_saves_s: list[float] = []


class LossEnds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    first: float | None
    last: float | None


class Best(BaseModel):
    """The best checkpoint by train.keep_best: its step, the watched number and every validation metric."""

    model_config = ConfigDict(extra="forbid")

    step: int
    metric: str
    mode: str
    value: float
    metrics: dict[str, Any]
    checkpoint: str | None = None


class Summary(Record):
    """What a finished run did and where its model is (summary.json). It leads with what a user reads first:
    the final evaluation per split, the best step, how many tokens were trained and the wall time."""

    what: ClassVar[str] = "run summary"
    status: str
    metrics: dict[str, dict[str, Any]]  # split → the final model's evaluation
    best: Best | None = None
    stopped_early_at: int | None = None  # the step early stopping ended the run at
    trained_tokens: int | None = None  # non-padding input tokens of the trained batches, every rank and launch
    wall_time_s: float | None = None  # from `launch` starting to this summary
    final_model: str | None  # the exported folder (None: nothing was trained, train.max_steps=0)
    final_step: int | None = None  # the step whose model final/ holds (train.final: best or last)
    world_size: int
    distributed_type: str
    backend: str
    hosts: list[str]
    steps: int
    steps_this_launch: int
    epochs: float
    samples_seen: int
    resumed_from: str | None
    resumed_world_size: int | None  # the checkpoint's world size (may differ from world_size)
    train_loss: LossEnds
    param_checksum_per_rank: list[float]
    strategy: str
    sharded: str  # what the strategy shards (ddp: nothing)
    held_per_rank: list[list[int]]  # [local, whole] elements of what is sharded, per rank
    adapter_norms: dict[str, float] | None  # LoRA: the trained values, to check the saved adapter against
    plan: dict[str, Any]
    # peak bytes per rank (CUDA: allocated by torch; CPU: resident set), before the model and after training
    memory: dict[str, list[int]]
    timings: Timings
    ray: dict[str, Any] | None = Field(None, description="Ray only: node of each rank, threads, restored from Ray")
    throughput: dict[str, Any] | None = Field(
        None,
        description="tokens fed and trained, padding, tokens/s, MFU, step times per rank, stragglers "
        "(launcher.train.throughput); None when no step ran",
    )


# ----------------------------------------------------------------------------- pre-flight
class PreflightReport(Record):
    """The pre-flight verdict every rank reached (preflight.json); see launcher.train.preflight."""

    what: ClassVar[str] = "pre-flight report"
    status: str
    failures: list[str]
    world_size: int
    nodes: list[dict[str, Any]]
    allreduce: dict[str, Any]
    node_pairs: list[dict[str, Any]]
    slowest_pair: list[str] | None
    note: str | None
    version_mismatch: list[dict[str, Any]]
    versions: dict[str, str]
    needs_not_estimated: str | None
    ranks: list[dict[str, Any]]
    seconds: float
    timings: dict[str, float]


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def headline(summary: Summary) -> str:
    """The closing line of a run: the final evaluation per split, the best step, trained tokens, wall time."""
    parts = []
    for split, metrics in summary.metrics.items():
        numbers = " ".join(f"{k} {_number(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))
        parts.append(f"{split} {numbers}")
    if summary.best is not None:
        parts.append(f"best step {summary.best.step} ({summary.best.metric} {_number(summary.best.value)})")
    if summary.stopped_early_at is not None:
        parts.append(f"stopped early at step {summary.stopped_early_at}")
    trained = f"{summary.steps_this_launch} of {summary.steps} steps" if summary.steps else "evaluation only"
    if summary.trained_tokens:
        trained += f", {summary.trained_tokens:,} tokens"
    if summary.wall_time_s is not None:
        trained += f", {summary.wall_time_s:.0f} s"
    parts.append(trained)
    return " · ".join(parts)
