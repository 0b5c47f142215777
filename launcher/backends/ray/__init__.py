"""Ray backend: the same train.run inside Ray Train's TorchTrainer workers, with Ray's fault tolerance.

Every complete checkpoint is reported to Ray (train.run's on_checkpoint hook),
so when a worker or a node dies Ray restarts the whole worker group
(FailureConfig.max_failures) and each new worker resumes from the newest
reported checkpoint: model, optimizer, scheduler and RNG state, and the step,
from which the stateless sampler recomputes the exact next batch. A run that
still fails makes `launch` exit 1 naming the failed ranks and their cause.

`--submit` hands the same `launch` command to Ray Jobs instead, so it runs as
the driver on the cluster's head node (jobs.py: the job handle).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path
from typing import ClassVar

import yaml

from launcher.backends.base import Backend, Layout, Submission, scoped_environ
from launcher.backends.local import closing_line
from launcher.backends.ray.jobs import RayJob
from launcher.backends.ray.trainer import describe_failure, fit, job_runtime_env, newer_than_output_dir, run_name
from launcher.config.cluster import RayProfile
from launcher.config.recipe import Recipe
from launcher.errors import JobFailed, Problem, ProfileError, StoppedBySignal, TrainingFailed, UsageError
from launcher.ownership import claim
from launcher.planning.plan import Plan
from launcher.spec import SPEC_DIR, LaunchFacts, write_spec

__all__ = ["RayBackend", "RayJob", "newer_than_output_dir"]


class RayBackend(Backend):
    name: ClassVar[str] = "ray"
    profile: RayProfile

    def flag_problems(self, *, submit: bool, follow: bool) -> list[Problem]:
        if follow and not submit:
            return [Problem("--follow", "--follow streams a submitted Ray job's logs; add --submit")]
        return []

    def layout(self, *, nodes: int, procs: int | None) -> Layout:
        profile, problems = self.profile, []
        if profile.address == "local" and nodes != 1:
            problems.append(
                Problem(
                    "--nodes",
                    f"{nodes} nodes, but the profile's address is 'local' (a private one-node Ray); give the "
                    "address of a running cluster",
                )
            )
        if profile.gpus_per_node and procs is not None:
            problems.append(
                Problem(
                    "--procs",
                    "a GPU Ray profile runs one worker per GPU (gpus_per_node); --procs only sets CPU workers",
                )
            )
        per_node = profile.gpus_per_node or procs or profile.cpu_workers_per_node
        if profile.placement_strategy == "STRICT_SPREAD" and per_node > 1:
            problems.append(
                Problem(
                    "placement_strategy",
                    f"STRICT_SPREAD puts each worker on its own node, but {per_node} workers per node were asked "
                    "for; use PACK or SPREAD",
                )
            )
        if problems:
            raise ProfileError("cluster profile", problems)
        return Layout(nodes, per_node, "cuda" if profile.gpus_per_node else "cpu")

    def launch(self, recipe: Recipe, plan: Plan, facts: LaunchFacts, *, follow: bool) -> str:
        """Run every rank as a Ray Train worker, driven from this process."""
        import ray

        profile = self.profile
        facts = facts.on(ray_run_name=run_name(recipe))

        def stop(signum, _frame):
            raise StoppedBySignal(signum)

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            # the driver holds output_dir while the workers run; RAY_AUTH_MODE is read when ray is initialised
            with claim(Path(recipe.output_dir)), scoped_environ({"RAY_AUTH_MODE": profile.auth}):
                write_spec(Path(recipe.output_dir), recipe, plan, facts)
                fit(recipe, plan, profile, facts)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:  # from connect
            raise JobFailed(
                f"cannot join the Ray cluster at {profile.address!r} (auth: {profile.auth}): {exc}\n"
                "Is it up (ray status --address ADDRESS)?"
            ) from None
        except ray.train.TrainingFailedError as exc:
            raise TrainingFailed(
                f"training failed on Ray (worker group restarts allowed: max_failures {profile.max_failures}):\n"
                f"{describe_failure(exc)}"
            ) from None
        except KeyboardInterrupt:
            raise StoppedBySignal(signal.SIGINT) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            ray.shutdown()
        if recipe.data.prepare == "only":
            from launcher.commands.prepare import closing

            return closing(recipe)
        return closing_line(recipe)

    def submit(self, submission: Submission, recipe: Recipe) -> RayJob:
        """The same `launch` command as a Ray job; recorded in OUTPUT_DIR/launch/ for `launch status RUN_DIR`."""
        from ray.job_submission import JobSubmissionClient

        profile = self.profile
        if profile.dashboard is None:
            raise ProfileError(
                "cluster profile",
                [Problem("dashboard", "--submit goes through Ray Jobs; set dashboard: http://HEAD:8265")],
            )
        command = ["-m", "launcher.cli", str(submission.recipe), *submission.overrides]
        command += ["--nodes", str(submission.nodes)]
        if submission.cluster is not None:  # else the head finds the profile as this launch did (RAY_ADDRESS)
            command += ["--cluster", str(submission.cluster)]
        if submission.procs is not None:
            command += ["--procs", str(submission.procs)]
        if "working_dir" in profile.runtime_env:  # uploaded by Ray; paths are relative to it
            entrypoint = shlex.join(["python", *command])
        else:  # the head sees this folder and this Python (a shared filesystem)
            entrypoint = f"cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *command])}"
        spec = Path(recipe.output_dir) / SPEC_DIR
        with claim(Path(recipe.output_dir), submitting=True):  # then the job holds it (launch/jobs: ownership)
            with scoped_environ({"RAY_AUTH_MODE": profile.auth}):
                client = JobSubmissionClient(profile.dashboard)
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(profile))
            (spec / "cluster.yaml").write_text(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
            with open(spec / "jobs", "a") as jobs:
                jobs.write(job_id + "\n")
        print(f"submitted Ray job {job_id}; its logs: ray job logs --follow {job_id} --address {profile.dashboard}")
        return RayJob(job_id, profile.dashboard, Path(recipe.output_dir))

    def job(self, job_id: str, run_dir: Path | None = None) -> RayJob:
        if self.profile.dashboard is None:
            raise UsageError.one("--cluster", "a Ray job is reached through Ray Jobs: the profile needs dashboard:")
        return RayJob(job_id, self.profile.dashboard, run_dir)
