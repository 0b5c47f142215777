"""Slurm backend. Outside an allocation `launch` renders a job script and submits it; inside one
(a srun task) it is the per-node agent that starts this node's ranks with torch.distributed.run.

The job script (slurm/job.sbatch.j2, rendered into the run directory) starts one agent per node
with srun; the agents meet in a c10d rendezvous on the first node of the allocation, at a port
derived from the job id. Secrets never reach a file: sbatch passes the submitting environment.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher.backends.local import Layout, count_gpus
from launcher.config.cluster import SlurmProfile, parse_bytes
from launcher.config.loading import Problem, RecipeError
from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan
from launcher.train.stop import EXIT_STOPPED

TEMPLATES = Path(__file__).resolve().parent
SCRIPT, LOG, JOBS = "job.sbatch", "slurm.log", "jobs"  # in the run directory; JOBS under launch/
RENDEZVOUS_JOIN_TIMEOUT_S = 300


class AllocationError(Exception):
    """The allocation cannot host this run (e.g. its first node's name does not resolve)."""


@dataclass(frozen=True)
class SlurmEnvironment:
    """One typed view of the SLURM_* variables, like submitit's JobEnvironment."""

    job_id: str
    num_nodes: int
    nodelist: str
    node_id: int | None  # None outside a step (batch script or salloc shell)
    restart_count: int

    @classmethod
    def detect(cls, environ=os.environ) -> SlurmEnvironment | None:
        if "SLURM_JOB_ID" not in environ:
            return None
        in_step = "SLURM_STEP_ID" in environ
        return cls(
            job_id=environ["SLURM_JOB_ID"],
            num_nodes=int(environ.get("SLURM_JOB_NUM_NODES", "1")),
            nodelist=environ.get("SLURM_JOB_NODELIST", ""),
            node_id=int(environ["SLURM_NODEID"]) if in_step else None,
            restart_count=int(environ.get("SLURM_RESTART_COUNT", "0")),
        )

    @property
    def rendezvous_port(self) -> int:
        """Same on every node without talking; below Linux's ephemeral range (32768+)."""
        return 15000 + int(self.job_id.split("_")[0]) % 15000

    def master_host(self) -> str:
        """The first node of the allocation, checked to resolve. Never localhost by default: on a
        multi-node job that would make every node train alone."""
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", self.nodelist], capture_output=True, text=True, timeout=60, check=True
            ).stdout.split()
        except (OSError, subprocess.SubprocessError) as exc:
            raise AllocationError(
                f"cannot expand SLURM_JOB_NODELIST={self.nodelist!r} with `scontrol show hostnames`: {exc}"
            ) from None
        if not out:
            raise AllocationError(f"SLURM_JOB_NODELIST={self.nodelist!r} names no host")
        try:
            socket.getaddrinfo(out[0], self.rendezvous_port)
        except OSError as exc:
            raise AllocationError(
                f"the first node {out[0]!r} of {self.nodelist!r} does not resolve ({exc}); the ranks cannot meet there"
            ) from None
        return out[0]


def layout(profile: SlurmProfile, *, nodes: int, procs: int | None) -> Layout:
    """Submitting: what the profile asks for. As an agent: what the allocation and this node have."""
    env = SlurmEnvironment.detect()
    gpus = profile.gpus_per_node
    if env is not None:
        if nodes not in (1, env.num_nodes):
            raise RecipeError(
                "command line",
                [
                    Problem(
                        "--nodes", f"{nodes} nodes asked, but this allocation (job {env.job_id}) has {env.num_nodes}"
                    )
                ],
            )
        nodes = env.num_nodes
        seen = count_gpus()
        if seen < gpus:
            raise RecipeError(
                "cluster profile",
                [Problem("gpus_per_node", f"{gpus} GPUs per node, but this node ({socket.gethostname()}) sees {seen}")],
            )
        gpus = seen
    if gpus and procs is not None and procs != gpus:
        raise RecipeError(
            "command line",
            [Problem("--procs", f"{procs} processes per node, but {gpus} GPUs per node (one rank each)")],
        )
    return Layout(nodes, gpus or procs or profile.procs_per_node, "cuda" if gpus else "cpu")


def launch(recipe: Recipe, plan: Plan, profile: SlurmProfile, t0: float, *, follow: bool = False) -> int:
    env = SlurmEnvironment.detect()
    if env is None:
        return submit(recipe, plan, profile, follow=follow)
    if env.node_id is None and env.num_nodes > 1:
        print(
            f"error: job {env.job_id} has {env.num_nodes} nodes; start one agent per node with\n"
            f"  srun --ntasks-per-node=1 --kill-on-bad-exit=1 launch {shlex.join(sys.argv[1:])}\n"
            "(see slurm/launch.sbatch)",
            file=sys.stderr,
        )
        return 2
    return agent(recipe, plan, profile, env, t0)


# ----------------------------------------------------------------------------- submitting
def resolved(profile: SlurmProfile) -> SlurmProfile:
    return profile.model_copy(update={"python": profile.python or sys.executable})


def render_script(recipe: Recipe, plan: Plan, profile: SlurmProfile) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    run_dir = Path(recipe.output_dir).resolve()
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    profile = resolved(profile)
    return env.get_template("job.sbatch.j2").render(
        p=profile,
        python=profile.python,
        job_name=run_dir.name,
        mem_mib=parse_bytes(profile.mem) // 2**20 if profile.mem else None,
        nodes=plan.num_nodes,
        procs_per_node=plan.procs_per_node,
        script=run_dir / SCRIPT,
        log=run_dir / LOG,
        spec=run_dir / "launch",
    )


def preview(recipe: Recipe, plan: Plan, profile: SlurmProfile) -> None:
    """--dry-run: the job script that would be submitted; nothing is written."""
    print(f"# {Path(recipe.output_dir).resolve() / SCRIPT}")
    print(render_script(recipe, plan, profile), end="")


def submit(recipe: Recipe, plan: Plan, profile: SlurmProfile, *, follow: bool) -> int:
    from launcher.backends import slurm_jobs
    from launcher.train.worker import write_spec

    run_dir = Path(recipe.output_dir).resolve()
    spec = write_spec(run_dir, recipe, plan)
    (spec / "cluster.yaml").write_text(yaml.safe_dump(resolved(profile).model_dump(mode="json"), sort_keys=False))
    script = run_dir / SCRIPT
    script.write_text(render_script(recipe, plan, profile))
    for name in profile.secret_env:
        if name not in os.environ:
            print(f"warning: secret_env names {name}, which is not set here; the job will not have it", file=sys.stderr)
    # --export=ALL: the job inherits this environment, secrets included, without writing them anywhere.
    done = subprocess.run(["sbatch", "--parsable", "--export=ALL", str(script)], capture_output=True, text=True)
    if done.returncode:
        print(f"error: sbatch refused the job:\n{done.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = done.stdout.strip().split(";")[0]
    with open(spec / JOBS, "a") as jobs:
        jobs.write(job_id + "\n")
    log = run_dir / LOG
    print(
        f"submitted job {job_id}: {plan.num_nodes} node(s) x {plan.procs_per_node} rank(s)\n"
        f"  run directory: {run_dir}\n  log:           {log}\n"
        f"  follow:        tail -f {log}   (or: launch status {run_dir};  stop: launch cancel {job_id})"
    )
    if follow:
        return slurm_jobs.follow(job_id, log)
    return 0


# ----------------------------------------------------------------------------- the per-node agent
def agent(recipe: Recipe, plan: Plan, profile: SlurmProfile, env: SlurmEnvironment, t0: float) -> int:
    """Start this node's ranks and wait for them; exit status for srun (non-zero stops every node)."""
    from launcher.backends.local import LaunchFailed, LaunchStopped, RanksStopped, run
    from launcher.train.worker import write_spec

    host = socket.gethostname()
    try:
        master = env.master_host()
    except AllocationError as exc:
        print(f"error: node {host}: {exc}", file=sys.stderr)
        return 1
    os.environ.update(profile.env)
    # The ranks get a stop signal themselves (Slurm signals every process of the step); the agent must
    # survive it (USR1's default action kills) and passes it on for a signal sent to the agent only.
    signal.signal(signal.SIGUSR1, _forward_to_children)
    rendezvous = [
        "--nnodes",
        str(env.num_nodes),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{master}:{env.rendezvous_port}",
        "--rdzv-id",
        f"slurm-{env.job_id}",
        "--rdzv-conf",
        f"join_timeout={RENDEZVOUS_JOIN_TIMEOUT_S}",
    ]
    node = f"node {host} ({(env.node_id or 0) + 1} of {env.num_nodes}, job {env.job_id})"
    print(f"[launch] {node}: {plan.procs_per_node} rank(s), rendezvous {master}:{env.rendezvous_port}", flush=True)
    # The spec goes to a node-local folder: nodes writing one shared file at once could be read half-written.
    with tempfile.TemporaryDirectory(prefix="launch-spec-") as folder:
        try:
            run(plan, write_spec(Path(folder), recipe, plan), t0, rendezvous)
        except LaunchFailed as exc:
            print(f"error: training failed on {node}:\n{exc}", file=sys.stderr, flush=True)
            return 1
        except LaunchStopped as exc:
            print(f"error: {node}: {exc}", file=sys.stderr, flush=True)
            return 128 + exc.signum
        except RanksStopped:
            pass  # requeue below, once the spec folder is gone: the requeue kills this process
        else:
            return 0
    return _after_stop(profile, env, node)


def _forward_to_children(signum, frame) -> None:
    import psutil

    for child in psutil.Process().children():
        child.send_signal(signum)


def _after_stop(profile: SlurmProfile, env: SlurmEnvironment, node: str) -> int:
    """Every rank checkpointed and stopped. Node 0 requeues the job (it resumes from that checkpoint);
    the other agents exit 0 so that srun does not kill node 0's agent before it has done so."""
    if not profile.requeue or env.node_id:
        print(f"[launch] {node}: ranks stopped after a checkpoint", flush=True)
        return 0 if profile.requeue else EXIT_STOPPED
    done = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True)
    if done.returncode:
        print(
            f"error: {node}: ranks stopped after a checkpoint, but `scontrol requeue {env.job_id}` failed "
            f"({done.stderr.strip()}); launch again to resume",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_STOPPED
    print(
        f"[launch] {node}: ranks stopped after a checkpoint; job {env.job_id} requeued, it resumes from there",
        flush=True,
    )
    return 0
