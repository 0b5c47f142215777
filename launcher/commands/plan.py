"""`launch plan RECIPE`: what fits where, before any job is queued.

Prints, for every strategy and offload choice, the estimated memory per GPU
(parameters, gradients, optimizer states, activations), host RAM per node, and
whether it fits; then what `strategy: auto` would choose and why. Reads the
model's config only (launcher/planning/memory.py), never its weights or the data.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

WIDTH = 100  # what the output fits outside a terminal (a terminal: its own width)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch plan", description="Memory per GPU for every strategy and offload choice.")
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe fields")
    p.add_argument("--nodes", type=int, default=1, metavar="N")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        metavar="G",
        help="GPUs per node (default: the cluster profile's gpus_per_node)",
    )
    p.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE",
        help="memory per GPU, e.g. 80GiB (default: the cluster profile's gpu_memory)",
    )
    p.add_argument("--cluster", type=Path, default=None, metavar="PROFILE", help="cluster profile YAML")
    return p


def console():
    """A terminal's own width; 100 columns in a file or a pipe (the tables are made to fit it)."""
    from rich.console import Console

    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=WIDTH)


def say(text: str, indent: str = "") -> None:
    """A plain line, wrapped to the output's width with a hanging indent."""
    print(textwrap.fill(text, console().width, initial_indent=indent, subsequent_indent=indent + "  "))


def print_table(recipe, shape, *, num_nodes: int, gpus_per_node: int, micro_batch: int, gpu_memory: int) -> None:
    """Two tables that each fit 100 columns: what fits (per GPU, host RAM, the verdict), then where each
    strategy's bytes go; a refusal's reason is a line under the first table."""
    from rich.table import Table

    from launcher.planning import memory

    g = memory.gib
    trainable = (
        f"{shape.num_trainable / 1e6:,.1f}M trainable of {shape.num_params / 1e6:,.1f}M"
        if shape.num_trainable != shape.num_params
        else f"{shape.num_params / 1e6:,.1f}M parameters"
    )
    ckpt = "on" if recipe.distributed.activation_checkpointing else "off"
    say(f"memory per GPU: {recipe.model.path} ({trainable})")
    say(
        f"{num_nodes} × {gpus_per_node} GPUs of {g(gpu_memory)} ({g(memory.usable(gpu_memory))} usable), micro-batch "
        f"{micro_batch} × {recipe.data.max_length} tokens, activation checkpointing {ckpt}"
    )
    fits, parts = Table(), Table(title="where the bytes per GPU go")
    for name in ("strategy", "per GPU", "host RAM/node", "fits"):
        fits.add_column(name, justify="right" if name in ("per GPU", "host RAM/node") else "left")
    for name in ("strategy", "parameters", "gradients", "optimizer", "activations"):
        parts.add_column(name, justify="left" if name == "strategy" else "right")
    refusals = []
    for est, problems in memory.estimates(
        recipe, shape, num_nodes=num_nodes, gpus_per_node=gpus_per_node, micro_batch=micro_batch
    ):
        label = est.choice.label
        if problems:
            verdict = "refused (below)"
            refusals.append(f"{label} refused: {problems[0].message.split(';')[0]}")
        else:
            verdict = "yes" if est.fits(gpu_memory) else "no"
        fits.add_row(label, g(est.per_gpu), g(est.host_per_node), verdict)
        parts.add_row(label, g(est.parameters), g(est.gradients), g(est.optimizer), g(est.activations))
    out = console()
    out.print(fits)
    for line in refusals:
        say(line, indent="  ")
    out.print(parts)


def main(argv: list[str]) -> int:
    """The table and auto's choice (0); a wrong recipe or flag raises (exit 2, printed by cli.main)."""
    args = parser().parse_intermixed_args(argv)
    from launcher.config.cluster import FoundProfile, LocalProfile, find_profile, parse_bytes
    from launcher.config.loading import load_recipe
    from launcher.errors import Problem, RecipeError, UsageError, UserError
    from launcher.planning import memory
    from launcher.planning.checks import check_model
    from launcher.planning.plan import micro_batch_size

    try:
        found = find_profile(args.cluster, args.nodes)
    except UsageError:  # several nodes and no profile anywhere: the flags say what the nodes have
        found = FoundProfile(LocalProfile(), "none found (the flags give the GPUs)")
    profile = found.profile
    recipe = load_recipe(args.recipe, args.overrides)
    problems = check_model(recipe)
    gpus = args.gpus_per_node or getattr(profile, "gpus_per_node", None)
    size = args.gpu_memory or getattr(profile, "gpu_memory", None)
    if args.nodes < 1:
        problems.append(Problem("--nodes", "must be at least 1"))
    if gpus is None or gpus < 1:
        problems.append(
            Problem("--gpus-per-node", "give the GPUs per node (at least 1), or gpus_per_node in the cluster profile")
        )
    gpu_memory = None
    try:
        gpu_memory = parse_bytes(size) if size else None
    except ValueError as exc:
        problems.append(Problem("--gpu-memory", str(exc)))
    if size is None:
        problems.append(
            Problem("--gpu-memory", "give the memory per GPU (e.g. 80GiB), or gpu_memory in the cluster profile")
        )
    if problems:
        raise UserError("plan", problems)  # the recipe's model, and the flags
    shape = memory.model_shape(recipe)
    micro = micro_batch_size(recipe, gpus * args.nodes)
    say(f"cluster profile: {found.source}")
    print_table(recipe, shape, num_nodes=args.nodes, gpus_per_node=gpus, micro_batch=micro, gpu_memory=gpu_memory)
    try:
        choice, why = memory.choose(
            recipe, shape, num_nodes=args.nodes, gpus_per_node=gpus, micro_batch=micro, gpu_memory=gpu_memory
        )
        say(f"auto: {choice.label} ({why})")
    except RecipeError as exc:
        say(exc.problems[0].message)
    return 0
