"""One run owns its output_dir: the launcher writes only into a folder it created (or an empty one), and one
launch at a time holds it.

- **Owned.** A folder is the launcher's when it holds OUTPUT_DIR/launch/lock (written when a launch first
  claims it) or launch/recipe.yaml (a run of an earlier version). A non-empty folder without either is
  refused before anything is written, naming what is there; `/`, the home folder and a source tree (a git
  work tree, the launcher's own repository) are refused even with a marker.
- **Held.** `claim()` takes an exclusive flock on launch/lock for as long as the launch runs, and writes who
  holds it (host, pid, Slurm job); the kernel releases it when the process ends, even by SIGKILL. A second
  launch tries the same lock without blocking and is refused at once, naming the holder (`in_use`). A
  submitted job holds the folder while it is queued, running or requeued: its id is the newest line of
  launch/jobs, and the scheduler says whether it has ended (so a Slurm requeue keeps it).
- **Deleted.** Only what the launcher wrote: its own checkpoint folders and temporary folders
  (train.checkpoint.prune, never through a symbolic link), and the export of an earlier launch of this run.

Torch-free; POSIX flock (local file systems, NFSv4, Lustre mounted with -o flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import JobFailed, Problem, RecipeError, UsageError
from launcher.spec import SPEC_DIR

LOCK = "lock"  # OUTPUT_DIR/launch/lock: the claim (and the marker that the launcher created the folder)
LEGACY_MARKER = "recipe.yaml"  # the spec of a run started before the lock existed


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / SPEC_DIR / LOCK


def owned(run_dir: Path) -> bool:
    spec = Path(run_dir) / SPEC_DIR
    return (spec / LOCK).is_file() or (spec / LEGACY_MARKER).is_file()


def _protected(run_dir: Path) -> str | None:
    """Why the launcher must never write into this folder, whatever it holds."""
    import launcher

    repository = Path(launcher.__file__).resolve().parent.parent
    if run_dir == Path(run_dir.anchor):
        return "the root of the file system"
    if run_dir == Path.home().resolve():
        return "your home folder"
    if run_dir == repository or (run_dir / ".git").exists():
        return "a source tree (it holds .git)" if run_dir != repository else "the launcher's own repository"
    return None


def folder_problems(output_dir: str) -> list[Problem]:
    """output_dir as a place to write: new, empty, or a run of the launcher; never a protected folder."""
    run_dir = Path(output_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        return []  # checks.check_paths names a file
    protected = _protected(run_dir)
    if protected:
        return [Problem("output_dir", f"{run_dir} is {protected}; the launcher writes a run into its own folder, "
                                      f"e.g. output_dir={run_dir / 'runs' / 'my-run'}")]  # fmt: skip
    if not run_dir.is_dir() or owned(run_dir):
        return []
    entries = sorted(p.name for p in run_dir.iterdir())
    if not entries:
        return []
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    return [
        Problem(
            "output_dir",
            f"{run_dir} already holds files that launch did not write ({shown}); a run would overwrite or delete "
            f"some of them (final/, metrics.jsonl, summary.json, checkpoint-*). Give a new or empty folder, e.g. "
            f"output_dir={run_dir / 'run'}, or move those files out",
        )
    ]


def _record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["since"])) if "since" in record else "?"
    job = f", Slurm job {record['job']}" if record.get("job") else ""
    return f"`launch` pid {record.get('pid', '?')} on host {record.get('host', '?')}{job} (since {since})"


def _own_job() -> str | None:
    """The id of the job this process runs in: a Slurm job, or a Ray Jobs submission (its driver's metadata)."""
    if "SLURM_JOB_ID" in os.environ:
        return os.environ["SLURM_JOB_ID"]
    try:  # launcher.backends.ray.trainer.IN_RAY_JOB
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))["metadata"]["job_submission_id"]
    except (ValueError, KeyError, TypeError):
        return None


def _active_job(run_dir: Path) -> str | None:
    """The job submitted for this folder (newest line of launch/jobs) if its scheduler says it has not ended
    (queued, running, requeued); None when there is none, it ended, or it is this process's own job."""
    jobs = Path(run_dir) / SPEC_DIR / "jobs"
    ids = jobs.read_text().split() if jobs.is_file() else []
    if not ids or ids[-1] == _own_job():
        return None
    from launcher.commands.jobs import find_job

    try:
        status = find_job(str(run_dir), None).status()
    except (JobFailed, UsageError, OSError, RecipeError):
        return None  # unknown to its scheduler (long ended, or submitted elsewhere): nothing holds the folder
    if status.ended:
        return None
    return f"job {status.job_id} ({status.state})"


# A submitted job can start before sbatch (or Ray Jobs) has returned its id to the `launch` that submitted it,
# which holds the lock until then: inside a job, a lock held by a submission is waited for this long.
JOB_START_PATIENCE_S = 60.0


def _held(path: Path) -> dict | None:
    """The record of whoever else holds the lock file now, or None (free, or held by this process's own job)."""
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _record(path)
            return None if record.get("job") and record.get("job") == _own_job() else record
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _wait_for_submitter(record: dict, deadline: float) -> bool:
    """Whether to wait for this holder: it is submitting a job, and this process runs in one (maybe that job)."""
    return bool(record.get("submitting")) and _own_job() is not None and time.time() < deadline


def in_use(run_dir: Path) -> str | None:
    """Who holds output_dir right now, or None. Never writes, and waits only for a submission in progress when
    run inside a job (JOB_START_PATIENCE_S). A follower node of a Slurm job step asks nothing: node 0 of its own
    job holds the folder (and a shared file system may show it the lock's record late)."""
    if _follower():
        return None
    path = lock_path(run_dir)
    deadline = time.time() + JOB_START_PATIENCE_S
    while path.is_file():
        record = _held(path)
        if record is None:
            break
        if not _wait_for_submitter(record, deadline):
            return _holder(record)
        time.sleep(0.2)
    return _active_job(run_dir)


def _refusal(run_dir: Path, holder: str) -> RecipeError:
    where = Path(run_dir).resolve()
    return RecipeError(
        "output_dir",
        [
            Problem(
                "output_dir",
                f"{where} is in use by {holder}: one run at a time writes there. Wait for it to end (launch status "
                f"{where}), stop it, or use another output_dir",
            )
        ],
    )


def refuse_if_in_use(run_dir: Path) -> None:
    holder = in_use(run_dir)
    if holder:
        raise _refusal(run_dir, holder)


def _follower() -> bool:
    """A node other than the first of a Slurm job step: its agent writes into the folder node 0's holds."""
    return "SLURM_STEP_ID" in os.environ and os.environ.get("SLURM_NODEID", "0") != "0"


@contextlib.contextmanager
def claim(run_dir: Path, submitting: bool = False) -> Iterator[None]:
    """Hold output_dir for the block: create it (and launch/), take the lock, write who holds it (`submitting`: a
    job is being submitted, which then holds the folder by its id). Raises RecipeError naming the holder when
    another launch has it."""
    if _follower():
        yield
        return
    run_dir = Path(run_dir)
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.time() + JOB_START_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _record(path)
                if not _wait_for_submitter(holder, deadline):
                    raise _refusal(run_dir, _holder(holder)) from None
                time.sleep(0.2)
        job = _active_job(run_dir)
        if job:
            raise _refusal(run_dir, job)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job": _own_job(), "since": time.time()}
        if submitting:
            record["submitting"] = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # releases the lock (as the end of the process would)
