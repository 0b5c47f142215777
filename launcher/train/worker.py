"""Entry point of one rank: end with the `launch` that started it (train.lifeline), read the launch spec the
launcher wrote (launcher.spec), call train.run.

`@record` makes torchrun collect this rank's exception into an error file, so
the launcher can name the rank and the cause when it fails.
"""

from __future__ import annotations

import signal

from launcher.train.lifeline import die_with_parent

die_with_parent()  # before torch is imported (seconds): a rank never outlives the `launch` that started it
# `launch` forwards USR1 (stop after a checkpoint) and USR2 (dump the stacks); until train.stop and the heartbeat
# install their handlers, such a signal is ignored rather than fatal (their default action ends the process)
for _early in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(_early, signal.SIG_IGN)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record  # noqa: E402

from launcher.spec import read_spec  # noqa: E402


@record
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", type=Path, help="folder holding recipe.yaml, plan.json and facts.json")
    args = parser.parse_args(argv)
    from launcher.errors import RecipeError
    from launcher.train.checkpoint import CheckpointMismatch, CheckpointWriteFailed
    from launcher.train.components import WorldMismatch
    from launcher.train.data import DataMismatch
    from launcher.train.preflight import PreflightFailed
    from launcher.train.run import run
    from launcher.train.trackers import TrackerFailed

    recipe, plan, facts = read_spec(args.spec)
    try:
        run(recipe, plan, facts)
    except (
        PreflightFailed,
        CheckpointMismatch,
        CheckpointWriteFailed,
        WorldMismatch,
        DataMismatch,
        RecipeError,
        TrackerFailed,
    ) as exc:
        # A verdict every rank reaches alike, whose message says it all: the launcher names it per rank from
        # the error file; a traceback from every rank would only bury it.
        get_error_handler().record_exception(exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
