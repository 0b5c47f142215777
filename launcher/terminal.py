"""Plain text where no terminal reads it: `launch`'s own output loses ANSI colour codes when it goes to a file
or a pipe (slurm.log, a CI log, `| tee`), whatever a library prints there (Ray's worker-line prefixes and
"repeated Nx" notes, its dashboard link), since such files are read in editors and web pages where the codes
show as `[36m` garbage. A terminal keeps its colours. The ranks do the same for library log records
(launcher.train.noise)."""

from __future__ import annotations

import io
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PlainText(io.TextIOBase):
    """A text stream that writes through to `stream` with the ANSI escape sequences removed."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def __getattr__(self, name: str):  # buffer, errors, ...: the wrapped stream's
        return getattr(self.stream, name)


def plain_unless_terminal() -> None:
    """Wrap sys.stdout and sys.stderr in PlainText unless they are terminals (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, PlainText) and not stream.isatty():
            setattr(sys, name, PlainText(stream))
