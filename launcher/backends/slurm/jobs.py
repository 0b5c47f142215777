"""Submitted Slurm jobs: the job handle behind `launch status`, `launch cancel` and --follow.

Job state comes from `scontrol show job` while the controller remembers the job (MinJobAge,
typically minutes after it ends), then from `sacct` where accounting is enabled.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.backends.base import Job, JobStatus
from launcher.backends.slurm.script import LOG
from launcher.errors import JobFailed, StoppedBySignal, UsageError
from launcher.spec import SPEC_DIR

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
# what scancel, scontrol and sacct are given: a job id, or an array job's task (1234_5); never an option (--me)
JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


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
    """The job's end as a `launch` exit status (launcher.errors): 0 completed, 1 failed,
    143 stopped from outside (scancel, time limit, preemption without requeue: launch again to resume)."""
    if info["JobState"] == "COMPLETED":
        return 0
    return 128 + signal.SIGTERM if info["JobState"] in STOPPED_FROM_OUTSIDE else 1


class SlurmJob(Job):
    """A job `launch` submitted with sbatch; its log is OUTPUT_DIR/slurm.log (every restart appends to it)."""

    def __init__(self, job_id: str, run_dir: Path | None = None, log: Path | None = None):
        if not JOB_ID.fullmatch(job_id):
            where = f"{run_dir / SPEC_DIR / 'jobs'} ends with" if run_dir is not None else "the job id is"
            raise UsageError.one(
                "RUN_DIR|JOBID",
                f"{where} {job_id!r}, which is not a Slurm job id (digits, or JOBID_TASK for an array job); "
                "give the job id itself (squeue --me lists them)",
            )
        super().__init__(job_id, run_dir)
        self.log = log or (run_dir / LOG if run_dir is not None else None)

    def _status(self, info: dict[str, str] | None) -> JobStatus:
        if info is None:
            raise JobFailed(f"job {self.job_id} is unknown to scontrol and sacct")
        rows = [
            (name, info[key])
            for name, key in [
                ("state", "JobState"),
                ("reason", "Reason"),
                ("nodes", "NodeList"),
                ("run time", "RunTime"),
                ("time limit", "TimeLimit"),
                ("restarts", "Restarts"),
                ("exit code", "ExitCode"),
            ]
            if info.get(key) not in (None, "", "None")
        ]
        state = info["JobState"]
        return JobStatus(
            job_id=self.job_id,
            state=state,
            ended=state in ENDED,
            succeeded=state == "COMPLETED",
            stopped_from_outside=state in STOPPED_FROM_OUTSIDE,
            rows=rows,
        )

    def status(self) -> JobStatus:
        return self._status(job_info(self.job_id))

    def cancel(self, checkpoint: bool = False) -> str:
        command = ["scancel", *(["--signal=USR1"] if checkpoint else []), self.job_id]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise JobFailed(f"{shlex.join(command)} failed: {done.stderr.strip()}")
        return f"{shlex.join(command)}: done"

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None and self.log.exists() else ""

    def follow(self) -> JobStatus:
        """Stream the log until the job ends (Ctrl-C stops following, not the job)."""
        offset, info = 0, None
        try:
            while True:
                info = job_info(self.job_id)
                offset = _print_new(self.log, offset)
                if info is None or info["JobState"] in ENDED:
                    break
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            raise StoppedBySignal(
                signal.SIGINT,
                message=f"stopped following; job {self.job_id} goes on (launch status {self.job_id}, "
                f"launch cancel {self.job_id})",
            ) from None
        time.sleep(POLL_S)  # the last lines may reach the shared file system just after the state changes
        _print_new(self.log, offset)
        status = self._status(info)
        status.summary = (
            f"job {self.job_id} {status.state} (exit {info.get('ExitCode', '?')}, restarts "
            f"{info.get('Restarts', '?')}, nodes {info.get('NodeList', '?')}): launch exits {exit_status(info)}"
        )
        return status


def _print_new(log: Path | None, offset: int) -> int:
    if log is None or not log.exists():
        return offset
    with open(log, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    sys.stdout.write(chunk.decode(errors="replace"))
    sys.stdout.flush()
    return offset + len(chunk)
