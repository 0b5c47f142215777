"""The `launch` command: parse, load, check, plan, dispatch; the one place errors become exit statuses.

Library code raises (launcher.errors); `main` prints each error once and maps it to the documented exit
status: 0 success, 1 the training failed, 2 the recipe, profile, data or a flag is wrong, 128 + N when
`launch` was stopped by signal N (130 for Ctrl-C, 143 for SIGTERM), 75 when the ranks were asked to stop
(USR1: launcher.train.stop) and wrote a checkpoint. Nothing on the --help or --dry-run path imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import ExitCode, StoppedBySignal, StoppedOnRequest, TrainingFailed, UserError, exit_code_of
from launcher.terminal import plain_unless_terminal

EPILOG = """\
examples:
  launch recipes/quickstart.yaml                       all local GPUs, or 1 CPU process
  launch recipes/quickstart.yaml --procs 2             2 CPU processes (gloo)
  launch recipes/quickstart.yaml --dry-run             validate and print the plan; start nothing
  launch recipes/x.yaml train.optimizer.lr=1e-5 data.max_length=256   overrides, validated like the file
  launch recipes/x.yaml --nodes 4 --cluster cluster/ray.yaml            Ray Train workers on a Ray cluster
  launch recipes/x.yaml --nodes 4 --cluster cluster/ray.yaml --submit --follow   as a Ray job, logs streamed
  launch recipes/x.yaml --nodes 4 --cluster cluster/slurm.yaml --follow   sbatch job; stream its log
  launch status runs/x        launch cancel runs/x              a submitted job's state; cancel it
  launch export runs/x --merge                         a LoRA run's adapter folded into full weights
  launch eval recipes/x.yaml [--model runs/x/final]    validation + test metrics of the base or an exported model
  launch plan recipes/x.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB   memory per GPU of every strategy
  launch preflight recipes/x.yaml --nodes 4 --cluster cluster/slurm.yaml   versions, bandwidth, shared FS, RAM/disk
  launch prepare recipes/x.yaml [--nodes 4 --cluster cluster/slurm.yaml]   tokenize into the cache, start no rank

exit status: 0 done, 1 training failed (the failing rank is named), 2 invalid recipe or data,
             128+N stopped by signal N, 75 stopped on request (USR1) after a checkpoint (relaunch to resume).
"""

# `launch NAME ...` runs a subcommand instead of a recipe: name → "module:function(argv) -> int"
SUBCOMMANDS: dict[str, str] = {
    "status": "launcher.commands.jobs:status_command",
    "cancel": "launcher.commands.jobs:cancel_command",
    "export": "launcher.commands.export:main",
    "eval": "launcher.commands.eval:main",
    "plan": "launcher.commands.plan:main",
    "preflight": "launcher.commands.preflight:main",
    "prepare": "launcher.commands.prepare:main",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch",
        description="Fine-tune a pretrained model from one YAML recipe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe fields")
    p.add_argument(
        "--procs",
        type=int,
        default=None,
        metavar="N",
        help="processes on this machine (default: one per visible GPU, else 1 CPU process)",
    )
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (needs a Slurm or Ray cluster profile)")
    p.add_argument(
        "--cluster",
        type=Path,
        default=None,
        metavar="PROFILE",
        help="cluster profile YAML (default: $LAUNCHER_CLUSTER, else ~/.config/launcher/cluster.yaml, else for "
        "--nodes > 1 a detected cluster: RAY_ADDRESS, or sbatch on PATH)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate, print the plan (and job script), start nothing")
    p.add_argument("--submit", action="store_true", help="submit as a Ray job (Ray profile) and print its id")
    p.add_argument("--follow", action="store_true", help="cluster jobs: stream the log, exit with the job's status")
    return p


@dataclass
class LaunchRequest:
    """What to launch, as the command line (or `launch preflight`) asked for it."""

    recipe: Path
    overrides: list[str]
    procs: int | None = None
    nodes: int = 1
    cluster: Path | None = None
    dry_run: bool = False
    submit: bool = False
    follow: bool = False  # the user's --follow
    wait: bool = False  # wait for the outcome of a submitted job even without --follow (launch preflight)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LaunchRequest:
        return cls(args.recipe, args.overrides, args.procs, args.nodes, args.cluster, args.dry_run, args.submit,
                   args.follow)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else argv
    plain_unless_terminal()  # a log file gets no colour codes, whoever prints them (Ray, rich)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            module, function = SUBCOMMANDS[argv[0]].split(":")
            return int(getattr(importlib.import_module(module), function)(argv[1:]))
        return int(launch_recipe(LaunchRequest.from_args(parser().parse_intermixed_args(argv)), started))
    except StoppedOnRequest as exc:
        print(f"stopped: {exc}", file=sys.stderr)
    except (UserError, TrainingFailed, StoppedBySignal) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code_of(exc)
    return ExitCode.STOPPED


def launch_recipe(request: LaunchRequest, started: float | None = None) -> ExitCode:
    """Check everything, print the plan, then dry-run, submit, or launch through the profile's backend."""
    from launcher.backends import backend_for
    from launcher.backends.base import Submission
    from launcher.config.cluster import find_profile, parse_bytes
    from launcher.config.loading import load_recipe
    from launcher.errors import Problem, RecipeError, UsageError
    from launcher.ownership import in_use, refuse_if_in_use
    from launcher.planning.checks import check_recipe, ignored_settings, missing_weights
    from launcher.planning.data_cache import make_data_plan
    from launcher.planning.packing import train_lengths
    from launcher.planning.plan import make_plan
    from launcher.spec import LaunchFacts

    problems = []
    if request.procs is not None and request.procs < 1:
        problems.append(Problem("--procs", "must be at least 1"))
    if request.nodes < 1:
        problems.append(Problem("--nodes", "must be at least 1"))
    if problems:
        raise UsageError("command line", problems)
    found = find_profile(request.cluster, request.nodes)
    profile = found.profile
    backend = backend_for(profile)
    problems = backend.flag_problems(submit=request.submit, follow=request.follow)
    if problems:
        raise UsageError("command line", problems)
    recipe = load_recipe(request.recipe, request.overrides)
    problems = backend.recipe_problems(recipe)
    if problems:
        raise RecipeError("recipe", problems)
    run_dir = Path(recipe.output_dir)
    holder = in_use(run_dir)  # first, and in milliseconds: a second launch into a busy output_dir stops here
    if holder and not request.dry_run:
        refuse_if_in_use(run_dir)
    elif holder:
        print(f"warning: output_dir is in use by {holder}; launching now would be refused", file=sys.stderr)
    summary = check_recipe(recipe)
    layout = backend.layout(nodes=request.nodes, procs=request.procs)
    gpu_memory = parse_bytes(profile.gpu_memory) if getattr(profile, "gpu_memory", None) else layout.gpu_memory
    data_plan = make_data_plan(recipe, summary)
    packing = recipe.data.packing == "pack"  # the plan counts bins: the rows' token lengths (tokenized, cached)
    plan = make_plan(
        recipe,
        num_train_samples=summary.counts["train"],
        num_validation_samples=summary.counts["validation"],
        num_test_samples=summary.counts["test"],
        num_nodes=layout.num_nodes,
        procs_per_node=layout.procs_per_node,
        device=layout.device,
        gpu_memory=gpu_memory,
        train_lengths=train_lengths(recipe, data_plan) if packing else None,
        peak_tflops=getattr(profile, "peak_tflops", None),
        data=data_plan,
    )
    resume = resume_point(recipe, plan)
    for note in [*ignored_settings(recipe, summary), *plan.warnings]:
        print(f"warning: {note}", file=sys.stderr)
    for note in summary.notes:
        print(f"warning: {note}", file=sys.stderr)
    for split, count in summary.dropped.items():
        if count:
            print(f"warning: dropped {count} rows of {split} that cannot train (data.on_missing=drop)", file=sys.stderr)
    print_plan(recipe, plan, resume, gpu_memory, found.source)
    if request.dry_run:
        preview = backend.preview(recipe, plan)  # what a cluster backend would submit
        if preview is not None:
            print(preview, end="")
        return ExitCode.OK
    refused = missing_weights(recipe) if recipe.data.prepare != "only" else []
    if refused:
        raise RecipeError("launch", refused)
    if request.submit:
        submission = Submission(request.recipe, request.overrides, request.nodes, request.procs, found.path)
        job = backend.submit(submission, recipe)
        if request.follow:
            print(job.follow().outcome())
        return ExitCode.OK
    # ranks split their time to first step at the moment planning ended (the spec's launch facts)
    facts = LaunchFacts.now(started_at=started)
    print(backend.launch(recipe, plan, facts, follow=request.follow or request.wait))
    return ExitCode.OK


def resume_point(recipe, plan) -> str:
    """Where training will start, and the train settings that changed since that checkpoint (they take effect);
    a checkpoint that cannot continue this recipe, whose files do not match its manifest, or that holds a
    pickle naming code, is refused here, before launch (resume: auto passes over damaged ones with a warning)."""
    from launcher.errors import Problem, RecipeError
    from launcher.train.checkpoint import CheckpointMismatch, newest_intact
    from launcher.train.compatibility import check_compatible, settings_changes, unrecorded, world_size_note

    if plan.total_steps == 0:
        adapter = f" with the adapter {recipe.model.adapter}" if recipe.model.adapter else ""
        return f"evaluation only (train.max_steps=0) of {recipe.model.path}{adapter}: nothing is trained"
    try:
        found, skipped = newest_intact(Path(recipe.output_dir), recipe.train.resume)
        for note in skipped:
            print(f"warning: {note}; resuming from an older checkpoint", file=sys.stderr)
        if found is None:
            return "from the pretrained weights"
        state = check_compatible(found, recipe, plan)
    except CheckpointMismatch as exc:
        raise RecipeError("resume", [Problem("train.resume", str(exc))]) from None
    missing = unrecorded(state)
    if missing:
        print(f"warning: {found} was written by an earlier launcher, which did not record {', '.join(missing)}: "
              "a change of those since cannot be detected", file=sys.stderr)  # fmt: skip
    notes = [world_size_note(state, plan.world_size)]
    changes = settings_changes(state, recipe)
    if changes:
        notes.append(f"changed since the checkpoint, taking effect: {', '.join(changes)}")
    return f"step {state.step} of {found}" + "".join(f" ({note})" for note in notes if note)


def print_plan(recipe, plan, resume: str, gpu_memory: int | None, profile_source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from launcher.planning.plan import estimate_line

    table = Table(title=f"plan: {recipe.task.type} on {recipe.model.path}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("cluster profile", profile_source)
    for name, value in plan.rows():
        table.add_row(name, value)
    table.add_row("output", str(Path(recipe.output_dir).resolve()))
    table.add_row("start", resume)
    where = "GPU" if plan.device == "cuda" else "process"  # a CPU process's memory is host RAM
    table.add_row(f"memory per {where} (estimate)", estimate_line(recipe, plan, gpu_memory))
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
