"""What can go wrong, as exceptions, and the exit status of `launch` for each: decided here, printed by cli.main.

Library code raises; only `launcher.cli.main` prints an error and turns it into an exit status, so every
subcommand and backend ends the same way. No torch here: the command line imports it first.

    0    done                                        ExitCode.OK
    1    the run (or a submitted job) failed          TrainingFailed, JobFailed
    2    a wrong recipe, profile, data or flag        UserError (RecipeError, ProfileError, UsageError)
    75   the ranks stopped on request (USR1) after    StoppedOnRequest
         writing a checkpoint: launch again to resume
    128+N  `launch` was stopped by signal N           StoppedBySignal
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    STOPPED = 75  # EX_TEMPFAIL: not finished, resume later
    SIGNAL_BASE = 128  # + the signal's number


@dataclass
class Problem:
    """One thing wrong with the user's input: the field, what is wrong and what would be valid, and where."""

    path: str
    message: str
    where: str = ""  # "line 12" or "override train.lr=..."

    def render(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"  - {self.path or '<recipe>'}{where}: {self.message}"


class UserError(Exception):
    """Input the user can fix; carries every problem found, so one edit fixes them all. Exit status 2."""

    exit_code = ExitCode.USAGE

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = [f"{source}: {count}; nothing was started."] + [p.render() for p in problems]
        super().__init__("\n".join(lines))


class RecipeError(UserError):
    """The recipe, or the data and checkpoints it points at, is wrong."""


class ProfileError(UserError):
    """The cluster profile is wrong, or cannot host this run."""


class UsageError(UserError):
    """A command-line flag or argument is wrong."""

    @classmethod
    def one(cls, flag: str, message: str) -> UsageError:
        return cls("command line", [Problem(flag, message)])


class TrainingFailed(Exception):
    """The ranks failed; the message names the rank, its host and the cause. Exit 1."""

    exit_code = ExitCode.FAILED


class JobFailed(TrainingFailed):
    """A submitted job, the allocation it runs in, or a command that handles it (sbatch, scancel, Ray Jobs,
    the connection to a cluster) failed. Exit 1."""


class StoppedOnRequest(Exception):
    """Every rank agreed on a step, wrote its checkpoint and stopped (USR1: train.stop). Exit 75."""

    exit_code = ExitCode.STOPPED


class StoppedBySignal(Exception):
    """`launch` itself got SIGTERM/SIGINT (scancel, Ctrl-C); every rank it started was stopped. Exit 128 + N."""

    def __init__(self, signum: int, where: str = "", message: str | None = None):
        self.signum = int(signum)
        self.exit_code = ExitCode.SIGNAL_BASE + self.signum
        super().__init__(
            message
            or f"{where}stopped by {signal.Signals(self.signum).name}; every rank was terminated. Launch the same "
            "command again to resume from the newest checkpoint."
        )


def exit_code_of(exc: BaseException) -> int:
    """The exit status for an exception cli.main caught (see the table above)."""
    return int(getattr(exc, "exit_code", ExitCode.FAILED))
