"""Local backend: this machine's GPUs (one process each, NCCL) or N CPU processes on gloo.

Ranks are started by torch.distributed.run, called in-process the way
`accelerate launch` does, so a failed rank comes back as a structured
ChildFailedError that names the rank, its host and the cause.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Literal, NamedTuple

from launcher.config.cluster import LocalProfile
from launcher.config.loading import Problem, RecipeError
from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan
from launcher.train.stop import EXIT_STOPPED


class LaunchFailed(Exception):
    """One or more ranks failed; the message names them and the cause."""


class RanksStopped(Exception):
    """Every rank was asked to stop (launcher.train.stop), agreed on a step and wrote its checkpoint."""


class LaunchStopped(Exception):
    """`launch` itself got SIGTERM/SIGINT (scancel, Ctrl-C); torchrun has stopped every rank."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; every rank was terminated. Launch the same "
            "command again to resume from the newest checkpoint."
        )


def count_gpus() -> int:
    """GPUs this process may use, without importing torch (keeps --dry-run fast)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible is not None:
        found = min(found, len([v for v in visible.split(",") if v.strip()]))
    return found


def worker_env(plan: Plan, t0: float) -> dict[str, str]:
    env = {"LAUNCHER_T0": str(t0), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if plan.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed (imported by transformers) would probe for GPUs and warn
    if plan.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would force 1; share the cores instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.procs_per_node))
    return env


COLLECTIVE_TIMEOUT_HINT = (
    " (a collective waited longer than distributed.collective_timeout: a peer rank hung, died or "
    "was far behind; distributed.hang_timeout makes the watchdog name it)"
)


def describe_failures(exc) -> str:
    """One line per failed rank: where it ran, how it ended, and the last line of its error."""
    host = socket.gethostname()
    lines = []
    for rank, failure in sorted(exc.failures.items()):
        if failure.exitcode < 0:
            cause = f"was killed by {failure.signal_name()}"
        else:
            cause = f"exited with code {failure.exitcode}"
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        last = [line.strip() for line in (message or "").splitlines() if line.strip()]
        detail = f": {last[-1]}" if last and not last[-1].startswith("To enable traceback") else ""
        if "Timed out waiting" in detail or "collective operation timeout" in detail:  # gloo's, NCCL's
            detail += COLLECTIVE_TIMEOUT_HINT
        lines.append(f"rank {rank} (local rank {failure.local_rank} on {host}, pid {failure.pid}) {cause}{detail}")
    return "\n".join(lines)


def _stopped_on_request(failures) -> bool:
    """Ranks exit EXIT_STOPPED only after the checkpoint every rank agreed on is in place; torchrun
    SIGTERMs the ranks still exiting when it sees the first one go, which loses nothing."""
    codes = [failure.exitcode for failure in failures]
    return EXIT_STOPPED in codes and all(code in (EXIT_STOPPED, -signal.SIGTERM) for code in codes)


class Layout(NamedTuple):
    """How many ranks a backend will start, and where."""

    num_nodes: int
    procs_per_node: int
    device: Literal["cpu", "cuda"]


def layout(profile: LocalProfile, *, nodes: int, procs: int | None) -> Layout:
    gpus = count_gpus()
    if nodes != 1:
        raise RecipeError(
            "command line",
            [
                Problem(
                    "--nodes",
                    f"{nodes} nodes need a cluster profile "
                    "(--cluster cluster/slurm.yaml or cluster/ray.yaml); "
                    "the local backend runs on this machine only",
                )
            ],
        )
    if "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1:
        # one standalone run per node would train each node alone, silently
        raise RecipeError(
            "cluster profile",
            [
                Problem(
                    "backend",
                    "local runs on one machine, but this is a step of "
                    "a multi-node Slurm job; drop --cluster (or use a slurm profile)",
                )
            ],
        )
    if gpus and procs is not None and procs > gpus:
        raise RecipeError("command line", [Problem("--procs", f"{procs} processes but {gpus} GPUs visible")])
    return Layout(1, procs or gpus or 1, "cuda" if gpus else "cpu")


def launch(recipe: Recipe, plan: Plan, profile: LocalProfile, t0: float, *, follow: bool = True) -> int:
    """Run every rank here; the exit status of `launch` (see launcher.cli). A local run always follows."""
    from launcher.train.worker import write_spec

    spec = write_spec(Path(recipe.output_dir), recipe, plan)
    os.environ.update(profile.env)
    try:
        run(plan, spec, t0)
    except LaunchFailed as exc:
        print(f"error: training failed:\n{exc}", file=sys.stderr)
        return 1
    except LaunchStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except RanksStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    print(f"done: {Path(recipe.output_dir).resolve() / result_file(recipe)}")
    return 0


def result_file(recipe: Recipe) -> str:
    """What a finished launch leaves in output_dir: the pre-flight report when only that ran."""
    return "preflight.json" if recipe.preflight.run == "only" else "summary.json"


STANDALONE = ["--standalone", "--nnodes", "1"]


def run(plan: Plan, spec_dir: Path, t0: float, rendezvous: list[str] = STANDALONE) -> None:
    """t0: when `launch` started, so ranks can report the time to their first step.
    rendezvous: torchrun's node arguments; this machine alone by default (the Slurm agent passes c10d's)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    os.environ.update(worker_env(plan, t0))
    args = get_args_parser().parse_args(
        [
            *rendezvous,
            "--nproc-per-node",
            str(plan.procs_per_node),
            "--max-restarts",
            "0",
            "--monitor-interval",
            "0.5",
            "-m",
            "launcher.train.worker",
            str(spec_dir),
        ]
    )
    watchdog = start_watchdog(spec_dir)
    try:
        torchrun(args)
    except ChildFailedError as exc:
        if watchdog is not None and watchdog.report is not None:
            raise LaunchFailed(watchdog.report) from None
        if _stopped_on_request(exc.failures.values()):
            raise RanksStopped(
                f"all {len(exc.failures)} ranks here stopped on request at a step boundary after "
                "writing a checkpoint; launch again to resume"
            ) from None
        raise LaunchFailed(describe_failures(exc)) from None
    except SignalException as exc:
        raise LaunchStopped(int(exc.sigval)) from None
    finally:
        if watchdog is not None:
            watchdog.stop()


def start_watchdog(spec_dir: Path):
    """The hang watchdog over the ranks this process starts (backends.watchdog); None when the recipe turns it off."""
    from launcher.backends.watchdog import Watchdog
    from launcher.train.worker import read_spec

    recipe, _ = read_spec(spec_dir)
    if not recipe.distributed.hang_timeout:
        return None
    watchdog = Watchdog(Path(recipe.output_dir), recipe.distributed.hang_timeout)
    watchdog.start()
    return watchdog
