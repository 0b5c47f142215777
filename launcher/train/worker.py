"""Entry point of one rank: read the launch spec the launcher wrote, call train.run.

`@record` makes torchrun collect this rank's exception into an error file, so
the launcher can name the rank and the cause when it fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from launcher.config.loading import dump_recipe
from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan

SPEC_DIR = "launch"


def write_spec(run_dir: Path, recipe: Recipe, plan: Plan) -> Path:
    """The resolved recipe and plan, as every rank will read them."""
    folder = run_dir / SPEC_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    (folder / "plan.json").write_text(plan.model_dump_json(indent=2))
    return folder


def read_spec(folder: Path) -> tuple[Recipe, Plan]:
    recipe = Recipe.model_validate(yaml.safe_load((folder / "recipe.yaml").read_text()))
    plan = Plan.model_validate_json((folder / "plan.json").read_text())
    return recipe, plan


@record
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", type=Path, help="folder holding recipe.yaml and plan.json")
    args = parser.parse_args(argv)
    from launcher.train.checkpoint import CheckpointMismatch
    from launcher.train.preflight import PreflightFailed
    from launcher.train.run import WorldMismatch, run

    recipe, plan = read_spec(args.spec)
    try:
        run(recipe, plan)
    except (PreflightFailed, CheckpointMismatch, WorldMismatch) as exc:
        # A verdict every rank reaches alike, whose message says it all: the launcher names it per rank from
        # the error file; a traceback from every rank would only bury it.
        get_error_handler().record_exception(exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
