"""The launch spec: what the launcher decided, written once for every rank to read (torch-free).

`OUTPUT_DIR/launch/` holds the resolved recipe (recipe.yaml), the plan (plan.json) and the launch facts
(facts.json: when `launch` started and when planning ended, so each rank can split its time to first step).
Ranks read these instead of environment variables or deciding again; a Slurm node's agent writes its own
copy into a node-local folder, and Ray hands the same three texts to its workers.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from launcher.config.loading import dump_recipe
from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan

SPEC_DIR = "launch"


class LaunchFacts(BaseModel):
    """When this launch started and when its checks and plan were done (Unix time), the git commit of the
    folder it ran in, and what the scheduler calls it (Slurm job id, Ray run name): trackers log these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    started_at: float
    planned_at: float
    git_commit: str | None = None
    scheduler: dict[str, str] = {}  # e.g. {"slurm_job_id": "123"}, {"ray_run_name": "x-1a2b3c4d"}

    @classmethod
    def now(cls, started_at: float | None = None) -> LaunchFacts:
        now = time.time()
        return cls(started_at=now if started_at is None else started_at, planned_at=now, git_commit=git_commit())

    def on(self, **scheduler: str) -> LaunchFacts:
        """These facts, with what the scheduler calls this launch."""
        return self.model_copy(update={"scheduler": {**self.scheduler, **scheduler}})


def git_commit(folder: Path | None = None) -> str | None:
    """HEAD of the git checkout `launch` runs in (with '-dirty' when it has uncommitted changes), or None."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=folder)
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10,
            cwd=folder,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_spec(run_dir: Path, recipe: Recipe, plan: Plan, facts: LaunchFacts) -> Path:
    """The resolved recipe, plan and launch facts, as every rank will read them."""
    folder = Path(run_dir) / SPEC_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    (folder / "plan.json").write_text(plan.model_dump_json(indent=2))
    (folder / "facts.json").write_text(facts.model_dump_json(indent=2))
    return folder


def read_spec(folder: Path) -> tuple[Recipe, Plan, LaunchFacts | None]:
    """What write_spec wrote; facts are None in a spec written before they existed (export of an old run)."""
    folder = Path(folder)
    recipe = Recipe.model_validate(yaml.safe_load((folder / "recipe.yaml").read_text()))
    plan = Plan.model_validate_json((folder / "plan.json").read_text())
    facts_file = folder / "facts.json"
    facts = LaunchFacts.model_validate_json(facts_file.read_text()) if facts_file.exists() else None
    return recipe, plan, facts
