"""`launch status RUN_DIR|JOBID` and `launch cancel RUN_DIR|JOBID`: a submitted job, through its backend's handle.

A run directory names its job: OUTPUT_DIR/launch/jobs (the newest job id last) and launch/cluster.yaml (the
profile it was submitted with, hence the backend). A bare job id is a Slurm job when it is a number, or the
job of the profile given with --cluster (a Ray Jobs submission id needs the profile's dashboard).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from launcher.backends.base import Job
from launcher.errors import ExitCode, UsageError
from launcher.spec import SPEC_DIR

JOBS_FILE = "jobs"
PROFILE_FILE = "cluster.yaml"


def find_job(target: str, cluster: Path | None) -> Job:
    """The job `target` names (a run directory or a job id)."""
    from launcher.backends import backend_for
    from launcher.config.cluster import LocalProfile, SlurmProfile, load_profile

    run_dir = Path(target)
    if run_dir.is_dir():
        spec = run_dir / SPEC_DIR
        if not spec.is_dir():
            raise UsageError.one("RUN_DIR|JOBID", f"{target} is neither a job id nor a run directory of `launch`")
        jobs = spec / JOBS_FILE
        ids = jobs.read_text().split() if jobs.exists() else []
        if not ids:  # launched here, not submitted: the local backend says so
            return backend_for(LocalProfile()).job("", run_dir)
        profile_file = spec / PROFILE_FILE
        profile = load_profile(profile_file if profile_file.exists() else cluster)
        return backend_for(profile).job(ids[-1], run_dir)
    if cluster is not None:
        return backend_for(load_profile(cluster)).job(target)
    if target.isdigit():
        return backend_for(SlurmProfile()).job(target)
    raise UsageError.one(
        "RUN_DIR|JOBID",
        f"{target} is not a run directory, and not a Slurm job id; for a Ray job id add --cluster PROFILE "
        "(the Ray profile with its dashboard)",
    )


def progress(run_dir: Path | None) -> str:
    """The newest step in metrics.jsonl against the plan's total."""
    if run_dir is None or not (run_dir / "metrics.jsonl").exists():
        return "-"
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step"))
        except ValueError:
            continue  # a line being written right now
    plan = run_dir / SPEC_DIR / "plan.json"
    total = json.loads(plan.read_text())["total_steps"] if plan.exists() else "?"
    return f"step {max((s for s in steps if isinstance(s, int)), default=0)} of {total}"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("target", help="run directory or job id")
    parser.add_argument("--cluster", type=Path, default=None, metavar="PROFILE",
                        help="the profile a bare job id belongs to (needed for a Ray job id)")  # fmt: skip
    return parser


def status_command(argv: list[str]) -> int:
    """`launch status RUN_DIR|JOBID`: a readable summary of the job, from its scheduler."""
    from rich.console import Console
    from rich.table import Table

    args = _parser("launch status", status_command.__doc__).parse_args(argv)
    job = find_job(args.target, args.cluster)
    status = job.status()
    table = Table(title=f"job {status.job_id}", show_header=False)
    for name, value in status.rows:
        table.add_row(name, value)
    table.add_row("progress", progress(job.run_dir))
    log = getattr(job, "log", None)
    if log is not None:
        table.add_row("log", str(log.resolve()))
    Console().print(table)
    return ExitCode.OK


def cancel_command(argv: list[str]) -> int:
    """`launch cancel RUN_DIR|JOBID`: stop the job; --checkpoint stops it after a checkpoint instead (Slurm)."""
    parser = _parser("launch cancel", cancel_command.__doc__)
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="Slurm: send USR1: every rank checkpoints at the next step, then the job requeues itself "
        "(what Slurm does before a time limit); cancel later to stop for good",
    )
    args = parser.parse_args(argv)
    print(find_job(args.target, args.cluster).cancel(checkpoint=args.checkpoint))
    return ExitCode.OK
