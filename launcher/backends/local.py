"""Local backend: this machine's GPUs (one process each, NCCL) or N CPU processes on gloo."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

from launcher.backends.base import Backend, Layout
from launcher.backends.torchrun import run_ranks, worker_env
from launcher.config.cluster import LocalProfile
from launcher.config.recipe import Recipe
from launcher.errors import Problem, ProfileError, UsageError
from launcher.ownership import claim
from launcher.planning.plan import Plan
from launcher.spec import LaunchFacts, write_spec


def count_gpus() -> int:
    """GPUs this process may use, without importing torch (keeps --dry-run fast)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible is not None:
        found = min(found, len([v for v in visible.split(",") if v.strip()]))
    return found


def gpu_memory() -> int | None:
    """Total memory of the smallest GPU this process may use, in bytes (None: no GPU or no nvidia-smi), read
    without importing torch, so that `strategy: auto` plans for this machine with no gpu_memory in a profile."""
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return smallest_gpu_memory(out, os.environ.get("CUDA_VISIBLE_DEVICES"))


def smallest_gpu_memory(csv: str, visible: str | None) -> int | None:
    """From nvidia-smi's `index, uuid, memory.total [MiB]` lines: the smallest of the GPUs that
    CUDA_VISIBLE_DEVICES (indices or UUIDs, or unset: all) lets this process use."""
    rows = [[field.strip() for field in line.split(",")] for line in csv.splitlines() if line.count(",") == 2]
    sizes = {(index, uuid): int(mib) * 2**20 for index, uuid, mib in rows if mib.isdigit()}
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        sizes = {key: size for key, size in sizes.items() if key[0] in wanted or key[1] in wanted}
    return min(sizes.values(), default=None)


def result_file(recipe: Recipe) -> str:
    """What a finished launch leaves in output_dir: the pre-flight report when only that ran."""
    return "preflight.json" if recipe.preflight.run == "only" else "summary.json"


def closing_line(recipe: Recipe) -> str:
    """The last line of a launch: the summary's headline (final metrics per split, best step, tokens, wall
    time), then where the result is."""
    from launcher.records import RecordError, Summary, headline

    path = Path(recipe.output_dir).resolve() / result_file(recipe)
    if recipe.preflight.run == "only":
        return f"done: {path}"
    try:
        return f"done: {headline(Summary.read(path))}\n  summary: {path}"
    except RecordError:
        return f"done: {path}"


class LocalBackend(Backend):
    name: ClassVar[str] = "local"
    profile: LocalProfile

    def layout(self, *, nodes: int, procs: int | None) -> Layout:
        gpus = count_gpus()
        if nodes != 1:
            raise UsageError.one(
                "--nodes",
                f"{nodes} nodes need a cluster profile (--cluster cluster/slurm.yaml or cluster/ray.yaml); the "
                "local backend runs on this machine only",
            )
        if "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) > 1:
            # one standalone run per node would train each node alone, silently
            raise ProfileError(
                "cluster profile",
                [
                    Problem(
                        "backend",
                        "local runs on one machine, but this is a step of a multi-node Slurm job; drop --cluster "
                        "(or use a slurm profile)",
                    )
                ],
            )
        if gpus and procs is not None and procs > gpus:
            raise UsageError.one("--procs", f"{procs} processes but {gpus} GPUs visible")
        return Layout(1, procs or gpus or 1, "cuda" if gpus else "cpu", gpu_memory() if gpus else None)

    def launch(self, recipe: Recipe, plan: Plan, facts: LaunchFacts, *, follow: bool) -> str:
        """Tokenize what the cache lacks, then run every rank here (a local run always follows), holding
        output_dir while they run."""
        from launcher.commands.prepare import before_ranks, closing

        print(before_ranks(recipe, plan), flush=True)
        if recipe.data.prepare == "only":
            return closing(recipe)
        with claim(Path(recipe.output_dir)):
            spec = write_spec(Path(recipe.output_dir), recipe, plan, facts)
            environ = {**os.environ, **self.profile.env}
            run_ranks(plan, spec, {**self.profile.env, **worker_env(plan, environ)})
        return closing_line(recipe)
