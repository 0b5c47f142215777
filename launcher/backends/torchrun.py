"""The ranks of one machine, started by torch.distributed.run in-process (as `accelerate launch` does), with
the hang watchdog beside them. The local backend runs it for the whole world; under Slurm each node's agent
runs it for its own ranks, with a c10d rendezvous across the nodes.

A failed rank comes back from torchrun as a structured ChildFailedError, named here by rank, host and cause.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

from launcher.backends.base import scoped_environ
from launcher.errors import ExitCode, StoppedBySignal, StoppedOnRequest, TrainingFailed
from launcher.planning.plan import Plan
from launcher.train.lifeline import AGENT_PID

STANDALONE = ["--standalone", "--nnodes", "1"]
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
COLLECTIVE_TIMEOUT_HINT = (
    " (a collective waited longer than distributed.collective_timeout: a peer rank hung, died or "
    "was far behind; distributed.hang_timeout makes the watchdog name it)"
)


def worker_env(plan: Plan, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What the ranks' environment adds to `environ` (the launcher's, with the profile's env applied)."""
    environ = os.environ if environ is None else environ
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if plan.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed (imported by transformers) would probe for GPUs and warn
    if plan.device == "cpu" and "OMP_NUM_THREADS" not in environ:
        # torchrun would force 1; share the cores instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.procs_per_node))
    return env


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
    """Ranks exit 75 only after the checkpoint every rank agreed on is in place; torchrun SIGTERMs the ranks
    still exiting when it sees the first one go, which loses nothing."""
    codes = [failure.exitcode for failure in failures]
    return ExitCode.STOPPED in codes and all(code in (ExitCode.STOPPED, -signal.SIGTERM) for code in codes)


def run_ranks(
    plan: Plan, spec_dir: Path, env: dict[str, str], rendezvous: list[str] = STANDALONE, where: str = ""
) -> None:
    """Start this machine's ranks on the spec and wait for them. `env`: what their environment adds to this
    process's (scoped: restored when they end). `rendezvous`: torchrun's node arguments (this machine alone
    by default; the Slurm agent passes c10d's). Raises TrainingFailed ("training failed{where}: ..."),
    StoppedOnRequest or StoppedBySignal."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

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
    # the ranks end with this process (train.lifeline), and get the signals it is sent but torchrun does not
    # handle: USR1 (checkpoint and stop: exit 75, as under Slurm) and USR2 (dump the stacks)
    forwarded = {signum: signal.signal(signum, forward_to_children) for signum in FORWARDED_SIGNALS}
    try:
        with scoped_environ({**env, AGENT_PID: str(os.getpid())}):
            torchrun(args)
    except ChildFailedError as exc:
        if watchdog is not None and watchdog.report is not None:
            raise TrainingFailed(f"training failed{where}:\n{watchdog.report}") from None
        if _stopped_on_request(exc.failures.values()):
            raise StoppedOnRequest(
                f"all {len(exc.failures)} ranks here stopped on request at a step boundary after "
                "writing a checkpoint; launch again to resume"
            ) from None
        raise TrainingFailed(f"training failed{where}:\n{describe_failures(exc)}") from None
    except SignalException as exc:
        raise StoppedBySignal(int(exc.sigval)) from None
    finally:
        for signum, previous in forwarded.items():
            signal.signal(signum, previous)
        if watchdog is not None:
            watchdog.stop()


def forward_to_children(signum, frame) -> None:
    """Pass a signal sent to this process on to the ranks it started (its child processes)."""
    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signum)


def start_watchdog(spec_dir: Path):
    """The hang watchdog over the ranks this process starts (backends.watchdog); None when the recipe turns it off."""
    from launcher.backends.watchdog import Watchdog
    from launcher.spec import read_spec

    recipe, _, _ = read_spec(spec_dir)
    if not recipe.distributed.hang_timeout:
        return None
    watchdog = Watchdog(Path(recipe.output_dir), recipe.distributed.hang_timeout)
    watchdog.start()
    return watchdog
