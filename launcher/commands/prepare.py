"""`launch prepare RECIPE [--nodes N --cluster P]`: tokenize into the cache ahead of training, before any
process group exists; and `before_ranks`, which every backend calls where it starts ranks.

`launch prepare` is `launch RECIPE data.prepare=only` (as `launch preflight` is preflight.run=only): the same
checks and plan, then the same backend, which writes the missing cache entries where ranks would start and
stops there: here (local), in the job's one step on every node (Slurm: each node's agent), or as one Ray task
per node (Ray). With a cache folder every node sees (data.cache_dir, LAUNCHER_CACHE_DIR), one process writes
each entry and the others wait on its lock file, never on a collective. The training launch then finds the
entries (its plan says so) and its ranks only open them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.config.recipe import Recipe
from launcher.planning.data_cache import cache_root, manifest
from launcher.planning.plan import Plan


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="launch prepare",
        description="Check the data and tokenize it into the cache, where the ranks will run; start no rank.",
    )
    parser.add_argument("recipe", type=Path, help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe fields")
    parser.add_argument("--cluster", type=Path, default=None, metavar="PROFILE", help="cluster profile YAML")
    parser.add_argument("--nodes", type=int, default=1, metavar="N")
    parser.add_argument("--procs", type=int, default=None, metavar="N", help="processes per node (for the plan)")
    parser.add_argument("--follow", action="store_true", help="cluster jobs: stream the log, exit with its status")
    args = parser.parse_intermixed_args(argv)
    from launcher.cli import LaunchRequest, launch_recipe

    request = LaunchRequest(
        args.recipe, [*args.overrides, "data.prepare=only"], args.procs, args.nodes, args.cluster, follow=args.follow
    )
    return launch_recipe(request)


def missing(recipe: Recipe, plan: Plan) -> list[str]:
    """Labels of the sources whose cache entry is not complete here."""
    if plan.data is None:
        return []
    root = cache_root(recipe)
    return [s.label for s in plan.data.sources if s.key and manifest(root / s.key) is None]


def before_ranks(recipe: Recipe, plan: Plan, where: str = "") -> str:
    """The missing cache entries written on this machine (one writer per entry, the others wait on its lock
    file); what was done, in lines for the user."""
    root = cache_root(recipe)
    if not missing(recipe, plan):
        return f"[launch] {where}data: every source is in the tokenized cache ({root})"
    from launcher.train.cache import prepare_cache

    lines = prepare_cache(recipe, plan.data, say=lambda line: print(f"[launch] {where}{line}", flush=True))
    return "\n".join(f"[launch] {where}data: {line}" for line in lines)


def closing(recipe: Recipe) -> str:
    """The last line of a `launch prepare` that ran here."""
    return f"prepared: the tokenized cache is in {cache_root(recipe)}; `launch` the same recipe to train on it"
