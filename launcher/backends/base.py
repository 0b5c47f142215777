"""The backend contract: how a (recipe, plan) becomes running ranks, and how a submitted job is handled.

After submitit's `Executor` + `Job`: a `Backend` (one per cluster profile's `backend:`) lays out the ranks,
launches them (here, or by submitting a job), previews what it would submit, and hands out a `Job` for a job
it submitted earlier (`launch status|cancel`): its status, cancel, follow and logs. The command line talks to
this interface only; a backend knows nothing of models, the ranks nothing of backends.

Backends raise (launcher.errors) and never print an error or pick an exit status themselves.
"""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

from launcher.config.recipe import Recipe
from launcher.errors import JobFailed, Problem, StoppedBySignal, UsageError
from launcher.planning.plan import Plan
from launcher.spec import LaunchFacts


class Layout(NamedTuple):
    """How many ranks a backend will start, and where."""

    num_nodes: int
    procs_per_node: int
    device: Literal["cpu", "cuda"]
    gpu_memory: int | None = None  # bytes per GPU, where the backend can see them (local: nvidia-smi)


@dataclass
class Submission:
    """A `launch` command line to run again on the cluster (Ray Jobs' --submit)."""

    recipe: Path
    overrides: list[str]
    nodes: int
    procs: int | None
    cluster: Path | None
    follow: bool = False


@dataclass
class JobStatus:
    job_id: str
    state: str  # the scheduler's own word (Slurm's COMPLETED, Ray's SUCCEEDED, ...)
    ended: bool
    succeeded: bool
    stopped_from_outside: bool = False  # cancelled, timed out, preempted: launch again to resume
    rows: list[tuple[str, str]] = field(default_factory=list)  # what `launch status` shows
    summary: str = ""  # one line for the end of --follow

    def outcome(self) -> str:
        """A followed job's end for `launch`: its summary when it succeeded; else raised (exit 1, or 143 when
        it was stopped from outside: scancel, time limit, preemption)."""
        line = self.summary or f"job {self.job_id} {self.state}"
        if self.succeeded:
            return line
        if self.stopped_from_outside:
            raise StoppedBySignal(signal.SIGTERM, message=f"{line}; launch again to resume from its checkpoint")
        raise JobFailed(line)


class Job(ABC):
    """A job a backend submitted. `run_dir`: its output_dir, when known (launch status RUN_DIR)."""

    def __init__(self, job_id: str, run_dir: Path | None = None):
        self.job_id, self.run_dir = job_id, run_dir

    @abstractmethod
    def status(self) -> JobStatus:
        """The scheduler's view of the job now."""

    @abstractmethod
    def cancel(self, checkpoint: bool = False) -> str:
        """Stop the job (with `checkpoint`: after the ranks wrote a checkpoint, where the backend can); what was
        done, in one line."""

    @abstractmethod
    def follow(self) -> JobStatus:
        """Stream the job's log here until it ends; its final status."""

    @abstractmethod
    def logs(self) -> str:
        """The job's log so far."""


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, profile):
        self.profile = profile

    def flag_problems(self, *, submit: bool, follow: bool) -> list[Problem]:
        """Command-line flags this backend cannot honour (default: it runs here, so no --submit)."""
        if submit:
            return [Problem("--submit", f"--submit needs a Ray cluster profile; the {self.name} backend runs here")]
        return []

    def recipe_problems(self, recipe: Recipe) -> list[Problem]:
        """What of a valid recipe this backend cannot carry (e.g. a path its job script cannot name)."""
        return []

    @abstractmethod
    def layout(self, *, nodes: int, procs: int | None) -> Layout:
        """Nodes, ranks per node and device for this launch, or a ProfileError / UsageError."""

    @abstractmethod
    def launch(self, recipe: Recipe, plan: Plan, facts: LaunchFacts, *, follow: bool) -> str:
        """Run the ranks here, or submit them (then wait only when `follow`); the closing line for the user."""

    def preview(self, recipe: Recipe, plan: Plan) -> str | None:
        """--dry-run: what would be submitted (a job script), or None when nothing is."""
        return None

    def submit(self, submission: Submission, recipe: Recipe) -> Job:
        """--submit: hand the whole `launch` command to the cluster's job system."""
        raise UsageError.one("--submit", f"the {self.name} backend has no job system to submit to")

    def job(self, job_id: str, run_dir: Path | None = None) -> Job:
        """The handle of a job this backend submitted (launch status|cancel)."""
        where = f"{run_dir} was" if run_dir else "runs of this profile are"
        raise UsageError.one(
            "RUN_DIR|JOBID",
            f"{where} launched by the {self.name} backend, which submits no job: there is nothing to query or "
            "cancel. Stop a running launch with Ctrl-C (or SIGTERM to `launch`); its progress is in "
            "OUTPUT_DIR/metrics.jsonl",
        )


@contextmanager
def scoped_environ(updates: Mapping[str, str]) -> Iterator[None]:
    """`updates` in os.environ for the block (child processes inherit them), the launcher's own restored after."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
