"""`launch preflight RECIPE`: the pre-flight checks alone (launcher.train.preflight), through the same backend."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    """`launch preflight RECIPE`: start the ranks exactly as `launch RECIPE` would (same backend, same
    layout), with preflight.run=only; exit 0 when every check passes, 1 when one fails, 2 on a bad recipe."""
    parser = argparse.ArgumentParser(
        prog="launch preflight",
        description="Run the pre-flight checks alone: "
        "versions, all-reduce bandwidth per node pair, shared output_dir, free RAM "
        "and disk per node. Writes OUTPUT_DIR/preflight.json.",
    )
    parser.add_argument("recipe", type=Path, help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe fields")
    parser.add_argument("--cluster", type=Path, default=None, metavar="PROFILE", help="cluster profile YAML")
    parser.add_argument("--nodes", type=int, default=1, metavar="N")
    parser.add_argument("--procs", type=int, default=None, metavar="N", help="processes per node")
    args = parser.parse_intermixed_args(argv)
    from launcher.cli import LaunchRequest, launch_recipe

    request = LaunchRequest(
        args.recipe, [*args.overrides, "preflight.run=only"], args.procs, args.nodes, args.cluster, wait=True
    )  # wait: the verdict of a submitted job is its exit status
    return launch_recipe(request)
