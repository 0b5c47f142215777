"""The job script: job.sbatch.j2 (package data, next to this module) rendered from the recipe's plan and the
profile into OUTPUT_DIR/job.sbatch. Values that reach the shell are quoted; see the template."""

from __future__ import annotations

import shlex
import sys
from importlib import resources
from pathlib import Path

from launcher.config.cluster import SlurmProfile, parse_bytes
from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan

SCRIPT, LOG = "job.sbatch", "slurm.log"  # in the run directory
TEMPLATE = "job.sbatch.j2"


def resolved(profile: SlurmProfile) -> SlurmProfile:
    """The profile as the job runs it: the compute nodes' Python defaults to the one running `launch`."""
    return profile.model_copy(update={"python": profile.python or sys.executable})


def template_text() -> str:
    """The template, read through importlib.resources: it is installed with the package (pyproject.toml)."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text()


def render_script(recipe: Recipe, plan: Plan, profile: SlurmProfile) -> str:
    from jinja2 import Environment, StrictUndefined

    run_dir = Path(recipe.output_dir).resolve()
    env = Environment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    profile = resolved(profile)
    return env.from_string(template_text()).render(
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
