"""Experiment trackers (train.report_to): TensorBoard, MLflow and Weights & Biases behind one small interface,
run on rank 0 and fed by the Reporter (train.report).

One output_dir is one tracker run. Each tracker's run id is stored in every checkpoint
(CheckpointState.trackers) and in output_dir/trackers.json, so a resumed launch (a relaunch, a Slurm
requeue, a Ray restart) continues the same run; and trackers.json records, per tracker, the last step sent
of each kind (train, validation, test), written *before* the send, so the steps a killed launch had already
sent are not sent again when they are trained again after the resume: one tracker run, no duplicated step.
The recipe and the plan are logged as parameters when a run is created; the launch's facts (git commit,
Slurm job id or Ray run name, world size, hosts, the pre-flight verdict) as tags at every launch.

Where the runs go is the libraries' own settings: MLFLOW_TRACKING_URI (and MLFLOW_EXPERIMENT_NAME),
WANDB_MODE (offline writes output_dir/wandb), WANDB_PROJECT; train.tracker_project names the experiment or
project for both. A tracker that fails to start stops the run before training (the error says which and
why); one that fails to log later is warned about once and training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from launcher.records import write_json_atomic

LEDGER = "trackers.json"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value


class TrackerFailed(RuntimeError):
    """A tracker could not start its run (unreachable server, bad credentials): said before training starts."""


@dataclass
class RunInfo:
    """What a tracker run is told about the run: its name, project, parameters (recipe and plan) and tags."""

    name: str
    project: str
    params: dict[str, Any]  # nested: {"recipe": {...}, "plan": {...}}
    tags: dict[str, str] = field(default_factory=dict)

    def flat_params(self) -> dict[str, str]:
        return {key: str(value)[:MAX_PARAM_CHARS] for key, value in flatten(self.params).items()}


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


class Tracker(ABC):
    name: ClassVar[str]
    note: str = ""  # said once after the start: where the run is, when that is not obvious

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    @abstractmethod
    def start(self, run_id: str | None, info: RunInfo) -> str:
        """Create the run (run_id None: parameters logged) or continue run_id; its id."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def close(self, finished: bool) -> None:
        """`finished`: the run completed (else it stopped, to be resumed)."""


class TensorBoard(Tracker):
    """Event files in output_dir/tensorboard: the folder is the run."""

    name = "tensorboard"

    def start(self, run_id, info):
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run_dir / "tensorboard"
        self.writer = SummaryWriter(str(folder))
        if run_id is None:
            table = "\n".join(f"| {k} | {v} |" for k, v in info.flat_params().items())
            self.writer.add_text("parameters", "| name | value |\n|---|---|\n" + table, 0)
        self.writer.add_text("launch", "\n".join(f"- {k}: {v}" for k, v in info.tags.items()), 0)
        return str(folder)

    def log(self, metrics, step):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, finished):
        self.writer.close()


class MLflow(Tracker):
    """A run in MLFLOW_TRACKING_URI's experiment train.tracker_project (else MLFLOW_EXPERIMENT_NAME)."""

    name = "mlflow"

    def start(self, run_id, info):
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self.client = client = MlflowClient()
        if run_id is not None and client.get_run(run_id).info.lifecycle_stage == "deleted":
            run_id = None  # deleted in the UI since the last launch: a new run, rather than none
        if run_id is None:
            experiment = client.get_experiment_by_name(info.project)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(info.project)
            run_id = client.create_run(experiment_id, run_name=info.name).info.run_id
            params = [Param(k, v) for k, v in info.flat_params().items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                client.log_batch(run_id, params=params[start : start + 100])
        else:
            client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v[:MAX_PARAM_CHARS]) for k, v in info.tags.items()])
        self.run_id = run_id
        return run_id

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self, finished):
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class WandB(Tracker):
    """A W&B run (WANDB_MODE=offline: written under output_dir/wandb, `wandb sync` uploads it later)."""

    name = "wandb"

    def start(self, run_id, info):
        import wandb

        settings = wandb.Settings(console="off", silent=True)  # our logs stay ours: no stdout capture, no banner
        self.run = wandb.init(
            project=info.project,
            name=info.name,
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(self.run_dir),
            config=info.params if run_id is None else None,
            tags=[f"{k}:{v}"[:64] for k, v in info.tags.items() if k in ("git_commit", "slurm_job_id", "ray_run_name")],
            settings=settings,
        )
        self.run.config.update({"launch": info.tags}, allow_val_change=True)
        if self.run.settings.mode == "offline":
            self.note = f" (offline; upload with: wandb sync {self.run.settings.sync_dir})"
        return self.run.id

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self, finished):
        self.run.finish(exit_code=0 if finished else 1)


# train.report_to name → its tracker; total over config.recipe.Tracker (tests/unit/test_registries.py)
TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in (TensorBoard, MLflow, WandB)}


def run_info(recipe, plan, facts, hosts: list[str], run_dir: Path) -> RunInfo:
    """Parameters and tags of this launch's tracker runs."""
    project = recipe.train.tracker_project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "launcher"
    if "wandb" in recipe.train.trackers and not recipe.train.tracker_project:
        project = os.environ.get("WANDB_PROJECT") or project
    tags = {"output_dir": str(run_dir), "world_size": str(plan.world_size), "hosts": ",".join(hosts)}
    if facts is not None:
        tags.update({k: v for k, v in facts.scheduler.items()})
        if facts.git_commit:
            tags["git_commit"] = facts.git_commit
    preflight = run_dir / "preflight.json"
    if preflight.exists():
        report = json.loads(preflight.read_text())
        tags["preflight.status"] = str(report.get("status"))
        tags["preflight.allreduce_GBps"] = str(report.get("allreduce", {}).get("bus_bandwidth_GBps"))
        tags["preflight"] = json.dumps({k: report.get(k) for k in ("status", "failures", "nodes", "note")})
    return RunInfo(
        name=run_dir.name,
        project=project,
        params={"recipe": recipe.model_dump(mode="json"), "plan": plan.model_dump(mode="json")},
        tags=tags,
    )


def read_ledger(path: Path) -> dict:
    """trackers.json, or {} when there is none (or it cannot be read: the runs then start afresh)."""
    try:
        ledger = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return ledger if isinstance(ledger, dict) else {}


class Trackers:
    """The recipe's trackers for one launch: started (or continued) at set-up, fed by the Reporter."""

    def __init__(self, names: list[str], run_dir: Path, resumed: dict[str, str] | None, fresh: bool, info: RunInfo,
                 logger: logging.Logger):  # fmt: skip
        self.path, self.logger = run_dir / LEDGER, logger
        ledger = {} if fresh else read_ledger(self.path)
        known = ledger.get("runs", {})
        ids = resumed if resumed else known  # a checkpoint's ids win; else those of a launch killed before one
        self.trackers = {name: TRACKERS[name](run_dir) for name in names}
        self.runs: dict[str, str] = {}
        # what earlier launches sent to the same runs: not sent again
        self.sent = {
            name: dict(ledger.get("sent", {}).get(name, {})) for name in names if known.get(name) == ids.get(name)
        }
        self.warned: set[str] = set()
        for name, tracker in self.trackers.items():
            try:
                self.runs[name] = tracker.start(ids.get(name), info)
            except Exception as exc:  # noqa: BLE001  (any library error, said plainly)
                raise TrackerFailed(f"{name}: cannot start its run: {type(exc).__name__}: {exc}") from exc
            self.sent.setdefault(name, {})
        self._write()
        for name, run_id in self.runs.items():
            continued = "continued" if ids.get(name) == run_id else "new"
            logger.info(f"tracker {name}: {continued} run {run_id}{self.trackers[name].note}")

    def _write(self) -> None:
        write_json_atomic(self.path, {"runs": self.runs, "sent": self.sent})

    def ids(self) -> dict[str, str]:
        return dict(self.runs)

    def log(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        """`metrics` of `kind` (train, or a split) at `step`, to every tracker that has not had them yet."""
        due = [name for name in self.trackers if step > self.sent[name].get(kind, -1)]
        if not due:
            return
        for name in due:
            self.sent[name][kind] = step
        self._write()  # before sending: a kill in between loses a point, never duplicates one
        for name in due:
            try:
                self.trackers[name].log(metrics, step)
            except Exception as exc:  # noqa: BLE001  (a tracker hiccup must not end a long run)
                if name not in self.warned:
                    self.warned.add(name)
                    self.logger.warning(f"tracker {name}: logging failed ({exc}); training goes on")

    def close(self, finished: bool) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.close(finished)
            except Exception as exc:  # noqa: BLE001
                self.logger.warning(f"tracker {name}: closing its run failed ({exc})")
