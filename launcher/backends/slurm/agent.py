"""The per-node agent: inside a job step (srun), `launch` starts this node's ranks with torch.distributed.run,
in a c10d rendezvous on the allocation's first node, and requeues the job after a stop request."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from launcher.backends.slurm.environment import AllocationError, SlurmEnvironment
from launcher.backends.torchrun import forward_to_children, run_ranks, worker_env
from launcher.config.cluster import SlurmProfile
from launcher.config.recipe import Recipe
from launcher.errors import JobFailed, StoppedBySignal, StoppedOnRequest
from launcher.planning.plan import Plan
from launcher.spec import LaunchFacts, write_spec

RENDEZVOUS_JOIN_TIMEOUT_S = 300


def agent(recipe: Recipe, plan: Plan, profile: SlurmProfile, env: SlurmEnvironment, facts: LaunchFacts) -> str:
    """Start this node's ranks and wait for them; a failure raises (a non-zero exit stops every node)."""
    host = socket.gethostname()
    try:
        master = env.master_host()
    except AllocationError as exc:
        raise JobFailed(f"node {host}: {exc}") from None
    # The ranks get a stop signal themselves (Slurm signals every process of the step); the agent must
    # survive it (USR1's default action kills) and passes it on for a signal sent to the agent only.
    signal.signal(signal.SIGUSR1, forward_to_children)
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
    from launcher.commands.prepare import before_ranks

    # before any process group: on a shared cache folder one node writes each entry, the others wait on its file
    print(before_ranks(recipe, plan, f"{node}: "), flush=True)
    if recipe.data.prepare == "only":
        return f"[launch] {node}: data prepared"
    print(f"[launch] {node}: {plan.procs_per_node} rank(s), rendezvous {master}:{env.rendezvous_port}", flush=True)
    environ = {**os.environ, **profile.env}
    # The spec goes to a node-local folder: nodes writing one shared file at once could be read half-written.
    with tempfile.TemporaryDirectory(prefix="launch-spec-") as folder:
        try:
            spec = write_spec(Path(folder), recipe, plan, facts)
            run_ranks(plan, spec, {**profile.env, **worker_env(plan, environ)}, rendezvous, where=f" on {node}")
        except StoppedBySignal as exc:
            raise StoppedBySignal(exc.signum, where=f"{node}: ") from None
        except StoppedOnRequest:
            pass  # requeue below, once the spec folder is gone: the requeue kills this process
        else:
            return f"[launch] {node}: done"
    return _after_stop(profile, env, node)


def _after_stop(profile: SlurmProfile, env: SlurmEnvironment, node: str) -> str:
    """Every rank checkpointed and stopped. Node 0 requeues the job (it resumes from that checkpoint);
    the other agents exit 0 so that srun does not kill node 0's agent before it has done so."""
    if not profile.requeue or env.node_id:
        if not profile.requeue:
            raise StoppedOnRequest(f"{node}: ranks stopped after a checkpoint; launch again to resume")
        return f"[launch] {node}: ranks stopped after a checkpoint"
    done = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True)
    if done.returncode:
        raise StoppedOnRequest(
            f"{node}: ranks stopped after a checkpoint, but `scontrol requeue {env.job_id}` failed "
            f"({done.stderr.strip()}); launch again to resume"
        )
    return f"[launch] {node}: ranks stopped after a checkpoint; job {env.job_id} requeued, it resumes from there"
