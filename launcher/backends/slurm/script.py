"""The job script: job.sbatch.j2 (package data, next to this module) rendered from the recipe's plan and the
profile into OUTPUT_DIR/job.sbatch.

Two parsers read it, and every value is made safe for the one that reads it: sbatch reads the #SBATCH lines
(up to the first command; `directive` quotes a value for sbatch's own word splitting, in which spaces, quotes,
backslashes and an unquoted # matter, and `filename_pattern` doubles the % of --output's file name pattern),
and bash reads the rest (`shquote`). No value holds a control character (config.strict.Strict), so none can
end a line; profile fields are also checked for Slurm's syntax (config.cluster.SYNTAX)."""

from __future__ import annotations

import re
import shlex
import sys
from importlib import resources
from pathlib import Path

from launcher.config.cluster import SlurmProfile, parse_bytes
from launcher.config.recipe import Recipe
from launcher.errors import Problem, RecipeError
from launcher.planning.plan import Plan

SCRIPT, LOG = "job.sbatch", "slurm.log"  # in the run directory
TEMPLATE = "job.sbatch.j2"


def resolved(profile: SlurmProfile) -> SlurmProfile:
    """The profile as the job runs it: the compute nodes' Python defaults to the one running `launch`."""
    return profile.model_copy(update={"python": profile.python or sys.executable})


def template_text() -> str:
    """The template, read through importlib.resources: it is installed with the package (pyproject.toml)."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text()


def directive(value) -> str:
    """A value of an #SBATCH line as sbatch splits it into words: plain when it has nothing sbatch reads
    specially, else double-quoted with \\ before each backslash, quote and # (sbatch strips them again)."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./:=,+@%&|*!()\[\]-]+", text):
        return text
    return '"' + re.sub(r"([\\\"'#])", r"\\\1", text) + '"'


def filename_pattern(value) -> str:
    """A path as a Slurm file name pattern (--output): % starts a replacement (%j, %x), %% is a plain %."""
    return str(value).replace("%", "%%")


def recipe_problems(recipe: Recipe) -> list[Problem]:
    """What of the recipe a job script cannot hold: Slurm drops every backslash of a file name pattern (and
    expands nothing in it then), so --output would name another file than the run's log."""
    run_dir = Path(recipe.output_dir).resolve()
    if "\\" in str(run_dir):
        return [Problem("output_dir", f"{run_dir} holds a backslash, which Slurm's --output cannot name; rename it")]
    return []


def render_script(recipe: Recipe, plan: Plan, profile: SlurmProfile) -> str:
    from jinja2 import Environment, StrictUndefined

    run_dir = Path(recipe.output_dir).resolve()
    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError("recipe", problems)
    env = Environment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["shquote"] = lambda value: shlex.quote(str(value))
    env.filters["directive"] = directive
    env.filters["filename_pattern"] = filename_pattern
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
