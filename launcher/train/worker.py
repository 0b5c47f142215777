"""Entry point of one rank: read the launch spec the launcher wrote (launcher.spec), call train.run.

`@record` makes torchrun collect this rank's exception into an error file, so
the launcher can name the rank and the cause when it fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from launcher.spec import read_spec


@record
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", type=Path, help="folder holding recipe.yaml, plan.json and facts.json")
    args = parser.parse_args(argv)
    from launcher.train.checkpoint import CheckpointMismatch
    from launcher.train.components import WorldMismatch
    from launcher.train.preflight import PreflightFailed
    from launcher.train.run import run
    from launcher.train.trackers import TrackerFailed

    recipe, plan, facts = read_spec(args.spec)
    try:
        run(recipe, plan, facts)
    except (PreflightFailed, CheckpointMismatch, WorldMismatch, TrackerFailed) as exc:
        # A verdict every rank reaches alike, whose message says it all: the launcher names it per rank from
        # the error file; a traceback from every rank would only bury it.
        get_error_handler().record_exception(exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
