"""Submitted Slurm jobs: follow one, `launch status`, `launch cancel`.

Job state comes from `scontrol show job` while the controller remembers the job (MinJobAge,
typically minutes after it ends), then from `sacct` where accounting is enabled.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.backends.slurm import JOBS, LOG

ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}
POLL_S = 1.0


def job_info(job_id: str) -> dict[str, str] | None:
    """JobState, ExitCode ("rc:signal"), NodeList, RunTime, Restarts, Reason... or None if unknown."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if shown.returncode == 0 and shown.stdout.strip():
        return dict(re.findall(r"(\S+?)=(\S*)", shown.stdout))
    fields = ["JobID", "State", "ExitCode", "NodeList", "Elapsed", "Reason"]
    acct = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields)], capture_output=True, text=True
    )
    rows = [line.split("|") for line in acct.stdout.splitlines() if line.strip()]
    if acct.returncode or not rows:
        return None
    row = dict(zip(fields, rows[-1]))
    return {
        "JobId": row["JobID"],
        "JobState": row["State"].split()[0],
        "ExitCode": row["ExitCode"],
        "NodeList": row["NodeList"],
        "RunTime": row["Elapsed"],
        "Reason": row["Reason"],
    }


STOPPED_FROM_OUTSIDE = {"CANCELLED", "TIMEOUT", "PREEMPTED", "DEADLINE"}


def exit_status(info: dict[str, str]) -> int:
    """The job's end as a `launch` exit status (see launcher.cli): 0 completed, 1 failed,
    143 stopped from outside (scancel, time limit, preemption without requeue: launch again to resume)."""
    if info["JobState"] == "COMPLETED":
        return 0
    return 128 + signal.SIGTERM if info["JobState"] in STOPPED_FROM_OUTSIDE else 1


def follow(job_id: str, log: Path) -> int:
    """Stream the job's log (every restart, it is one file) until the job ends; its exit status."""
    offset, info = 0, None
    try:
        while True:
            info = job_info(job_id)
            offset = _print_new(log, offset)
            if info is None or info["JobState"] in ENDED:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job_id} goes on (launch status {job_id}, launch cancel {job_id})",
            file=sys.stderr,
        )
        return 130
    time.sleep(POLL_S)  # the last lines may reach the shared file system just after the state changes
    _print_new(log, offset)
    if info is None:
        print(f"error: job {job_id} is unknown to scontrol and sacct", file=sys.stderr)
        return 1
    status = exit_status(info)
    print(
        f"job {job_id} {info['JobState']} (exit {info.get('ExitCode', '?')}, restarts {info.get('Restarts', '?')}, "
        f"nodes {info.get('NodeList', '?')}): launch exits {status}",
        file=sys.stderr if status else sys.stdout,
    )
    return status


def _print_new(log: Path, offset: int) -> int:
    if not log.exists():
        return offset
    with open(log, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    sys.stdout.write(chunk.decode(errors="replace"))
    sys.stdout.flush()
    return offset + len(chunk)


def resolve(target: str) -> tuple[str, Path | None]:
    """A job id, or a run directory → its newest job id."""
    if target.isdigit():
        return target, None
    run_dir = Path(target)
    jobs = run_dir / "launch" / JOBS
    if not jobs.exists():
        raise SystemExit(f"error: {target} is neither a job id nor a run directory submitted to Slurm (no {jobs})")
    return jobs.read_text().split()[-1], run_dir


def progress(run_dir: Path | None) -> str:
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return "-"
    steps = [
        json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    plan = run_dir / "launch" / "plan.json"
    total = json.loads(plan.read_text())["total_steps"] if plan.exists() else "?"
    return f"step {max((s for s in steps if s is not None), default=0)} of {total}"


def status_command(argv: list[str]) -> int:
    """`launch status RUN_DIR|JOBID`: a readable summary of the job, from squeue/scontrol/sacct."""
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="launch status", description=status_command.__doc__)
    parser.add_argument("target", help="run directory or job id")
    args = parser.parse_args(argv)
    job_id, run_dir = resolve(args.target)
    info = job_info(job_id)
    if info is None:
        print(f"error: job {job_id} is unknown to scontrol and sacct", file=sys.stderr)
        return 1
    table = Table(title=f"job {job_id}", show_header=False)
    for name, key in [
        ("state", "JobState"),
        ("reason", "Reason"),
        ("nodes", "NodeList"),
        ("run time", "RunTime"),
        ("time limit", "TimeLimit"),
        ("restarts", "Restarts"),
        ("exit code", "ExitCode"),
    ]:
        if info.get(key) not in (None, "", "None"):
            table.add_row(name, info[key])
    table.add_row("progress", progress(run_dir))
    if run_dir is not None:
        table.add_row("log", str((run_dir / LOG).resolve()))
    Console().print(table)
    return 0


def cancel_command(argv: list[str]) -> int:
    """`launch cancel RUN_DIR|JOBID`: scancel the job; --checkpoint stops it after a checkpoint instead."""
    parser = argparse.ArgumentParser(prog="launch cancel", description=cancel_command.__doc__)
    parser.add_argument("target", help="run directory or job id")
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="send USR1: every rank checkpoints at the next step, then the job requeues itself "
        "(what Slurm does before a time limit); cancel later to stop for good",
    )
    args = parser.parse_args(argv)
    job_id, _ = resolve(args.target)
    command = ["scancel", *(["--signal=USR1"] if args.checkpoint else []), job_id]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        print(f"error: {shlex.join(command)} failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"{shlex.join(command)}: done")
    return 0
