"""Ray Jobs submissions: the job handle behind `launch status|cancel` and `--submit --follow`."""

from __future__ import annotations

import signal
from pathlib import Path

from launcher.backends.base import Job, JobStatus
from launcher.errors import JobFailed, StoppedBySignal, UsageError

ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}


class RayJob(Job):
    """A `launch ... --submit` run on a Ray cluster, reached through its Ray Jobs (dashboard) address."""

    def __init__(self, job_id: str, dashboard: str, run_dir: Path | None = None):
        super().__init__(job_id, run_dir)
        self.dashboard = dashboard

    def _client(self):
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self.dashboard)
        except (ConnectionError, RuntimeError) as exc:
            raise JobFailed(f"cannot reach Ray Jobs at {self.dashboard}: {exc}") from None

    def status(self) -> JobStatus:
        try:
            info = self._client().get_job_info(self.job_id)
        except RuntimeError as exc:  # the Jobs API answers 404 as a RuntimeError
            raise JobFailed(f"Ray job {self.job_id} is unknown to {self.dashboard}: {exc}") from None
        state = info.status.value
        rows = [("state", state)]
        if info.message:
            rows.append(("message", info.message))
        if info.start_time:
            rows.append(("started", _when(info.start_time)))
        if info.end_time:
            rows.append(("ended", _when(info.end_time)))
        rows += [("entrypoint", info.entrypoint), ("dashboard", self.dashboard)]
        return JobStatus(
            job_id=self.job_id,
            state=state,
            ended=state in ENDED,
            succeeded=state == "SUCCEEDED",
            stopped_from_outside=state == "STOPPED",
            rows=rows,
            summary=f"Ray job {self.job_id}: {state}",
        )

    def cancel(self, checkpoint: bool = False) -> str:
        if checkpoint:
            raise UsageError.one(
                "--checkpoint",
                "Ray Jobs stops a job with SIGTERM and then SIGKILL; the run resumes from its newest checkpoint "
                "when launched again. Cancel without --checkpoint",
            )
        if not self._client().stop_job(self.job_id):
            return f"Ray job {self.job_id} had already ended"
        return f"ray job stop {self.job_id}: done"

    def logs(self) -> str:
        return self._client().get_job_logs(self.job_id)

    def follow(self) -> JobStatus:
        import asyncio

        client = self._client()

        async def stream() -> None:
            async for chunk in client.tail_job_logs(self.job_id):
                print(chunk, end="", flush=True)

        try:
            asyncio.run(stream())
        except KeyboardInterrupt:
            raise StoppedBySignal(
                signal.SIGINT,
                message=f"stopped following; the job keeps running (launch cancel {self.job_id} --cluster PROFILE, "
                f"or ray job stop {self.job_id} --address {self.dashboard})",
            ) from None
        return self.status()


def _when(milliseconds: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(milliseconds / 1000, tz=datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )
