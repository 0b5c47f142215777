"""Slurm backend. Outside an allocation `launch` renders a job script and submits it; inside one (a srun task)
it is the per-node agent that starts this node's ranks with torch.distributed.run.

The job script (script.py renders job.sbatch.j2 into the run directory) starts one agent per node with srun;
the agents (agent.py) meet in a c10d rendezvous on the first node of the allocation, at a port derived from
the job id. Secrets never reach a file: sbatch passes the submitting environment. jobs.py is the job handle.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import yaml

from launcher.backends.base import Backend, Layout
from launcher.backends.local import count_gpus
from launcher.backends.slurm.agent import agent
from launcher.backends.slurm.environment import SlurmEnvironment
from launcher.backends.slurm.jobs import SlurmJob
from launcher.backends.slurm.script import LOG, SCRIPT, recipe_problems, render_script, resolved
from launcher.config.cluster import SlurmProfile
from launcher.config.recipe import Recipe
from launcher.errors import JobFailed, Problem, ProfileError, UsageError
from launcher.ownership import claim
from launcher.planning.plan import Plan
from launcher.spec import LaunchFacts, write_spec

__all__ = ["JOBS", "LOG", "SCRIPT", "SlurmBackend", "SlurmEnvironment", "SlurmJob"]
JOBS = "jobs"  # under OUTPUT_DIR/launch/: one submitted job id per line, the newest last


class SlurmBackend(Backend):
    name: ClassVar[str] = "slurm"
    profile: SlurmProfile

    def layout(self, *, nodes: int, procs: int | None) -> Layout:
        """Submitting: what the profile asks for. As an agent: what the allocation and this node have."""
        env = SlurmEnvironment.detect()
        gpus = self.profile.gpus_per_node
        if env is not None:
            if nodes not in (1, env.num_nodes):
                raise UsageError.one(
                    "--nodes", f"{nodes} nodes asked, but this allocation (job {env.job_id}) has {env.num_nodes}"
                )
            nodes = env.num_nodes
            seen = count_gpus()
            if seen < gpus:
                raise ProfileError(
                    "cluster profile",
                    [
                        Problem(
                            "gpus_per_node", f"{gpus} GPUs per node, but this node ({socket.gethostname()}) sees {seen}"
                        )
                    ],
                )
            gpus = seen
        if gpus and procs is not None and procs != gpus:
            raise UsageError.one("--procs", f"{procs} processes per node, but {gpus} GPUs per node (one rank each)")
        return Layout(nodes, gpus or procs or self.profile.procs_per_node, "cuda" if gpus else "cpu")

    def launch(self, recipe: Recipe, plan: Plan, facts: LaunchFacts, *, follow: bool) -> str:
        env = SlurmEnvironment.detect()
        if env is None:
            return self._submit(recipe, plan, follow=follow)
        if env.node_id is None and env.num_nodes > 1:
            raise ProfileError(
                "Slurm allocation",
                [
                    Problem(
                        "launch",
                        f"job {env.job_id} has {env.num_nodes} nodes; start one agent per node with\n"
                        f"  srun --ntasks-per-node=1 --kill-on-bad-exit=1 launch {shlex.join(sys.argv[1:])}\n"
                        "(see slurm/launch.sbatch)",
                    )
                ],
            )
        with claim(Path(recipe.output_dir)):  # node 0's agent holds it; the job's id holds it between runs
            return agent(recipe, plan, self.profile, env, facts.on(slurm_job_id=env.job_id))

    def recipe_problems(self, recipe: Recipe) -> list[Problem]:
        return recipe_problems(recipe)

    def preview(self, recipe: Recipe, plan: Plan) -> str:
        """--dry-run: the job script that would be submitted; nothing is written."""
        return f"# {Path(recipe.output_dir).resolve() / SCRIPT}\n{render_script(recipe, plan, self.profile)}"

    def job(self, job_id: str, run_dir: Path | None = None) -> SlurmJob:
        return SlurmJob(job_id, run_dir)

    def _submit(self, recipe: Recipe, plan: Plan, *, follow: bool) -> str:
        profile = self.profile
        run_dir = Path(recipe.output_dir).resolve()
        text = render_script(recipe, plan, profile)  # refuses what it cannot write safely, before anything is written
        # held while submitting; from then on the job holds it (its id, the newest line of launch/jobs: ownership)
        with claim(run_dir, submitting=True):
            spec = write_spec(run_dir, _resuming_itself(recipe), plan, LaunchFacts.now())
            (spec / "cluster.yaml").write_text(
                yaml.safe_dump(resolved(profile).model_dump(mode="json"), sort_keys=False)
            )
            script = run_dir / SCRIPT
            script.write_text(text)
            for name in profile.secret_env:
                if name not in os.environ:
                    print(f"warning: secret_env names {name}, which is not set here; the job will not have it",
                          file=sys.stderr)  # fmt: skip
            # --export=ALL: the job inherits this environment, secrets included, without writing them anywhere.
            done = subprocess.run(["sbatch", "--parsable", "--export=ALL", str(script)], capture_output=True, text=True)
            if done.returncode:
                raise JobFailed(f"sbatch refused the job:\n{done.stderr.strip()}")
            job_id = done.stdout.strip().split(";")[0]
            with open(spec / JOBS, "a") as jobs:
                jobs.write(job_id + "\n")
        log = run_dir / LOG
        submitted = (
            f"submitted job {job_id}: {plan.num_nodes} node(s) x {plan.procs_per_node} rank(s)\n"
            f"  run directory: {run_dir}\n  log:           {log}\n"
            f"  follow:        tail -f {log}   (or: launch status {run_dir};  stop: launch cancel {job_id})"
        )
        if not follow:
            return submitted
        print(submitted, flush=True)
        return SlurmJob(job_id, run_dir).follow().outcome()


def _resuming_itself(recipe: Recipe) -> Recipe:
    """The recipe the job runs. `train.resume: never` holds at submission (output_dir has no checkpoint then:
    planning.checks.mixed_runs); a requeued job continues from its own checkpoints, so the job resumes `auto`."""
    if recipe.train.resume != "never":
        return recipe
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"resume": "auto"})})
