"""Clean logs on the ranks: library log records lose their ANSI colour codes (log files are read in editors,
`less` and CI pages, where they show as `[1m` garbage), and messages that are expected in a fine-tune are said
once, in plain words, or dropped.

A rule is (pattern, what to say instead: a function of the match, or None to drop the record). Records pass
through one filter on every library handler of the rank process (the root logger's, which bitsandbytes,
accelerate, peft and torch log through, and transformers' own), on rank 0; the other ranks keep errors only
(train.components.quiet_libraries), so each message appears once per run.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable

from launcher.terminal import ANSI

HEAD_PREFIXES = ("classifier.", "score.", "pre_classifier.", "qa_outputs.")  # heads a task adds, new by design


def _load_report(match: re.Match) -> str | None:
    """transformers' LOAD REPORT: when the only keys it lists are a new task head's MISSING weights, the head
    is new and starts random, as it must; any other finding is kept, uncoloured."""
    rows = re.findall(r"^(\S+)\s*\|\s*(\w+)\s*\|", match.string, flags=re.M)
    rows = [(key, status) for key, status in rows if key != "Key"]
    if rows and all(status == "MISSING" and key.startswith(HEAD_PREFIXES) for key, status in rows):
        keys = ", ".join(sorted(key for key, _ in rows))  # transformers lists them in no fixed order
        return f"the task head is new and starts random ({keys}): expected for a fine-tune"
    return match.string


RULES: list[tuple[re.Pattern, Callable[[re.Match], str | None] | None]] = [
    (re.compile(r"LOAD REPORT"), _load_report),
    (
        re.compile(r"Removed shared tensor (\{.*?\}) while saving"),
        lambda m: f"tied weights {m.group(1)} are saved once (they are one tensor): expected",
    ),
    # bitsandbytes at import, for a kernel of 4-bit matmuls on CPU that a run without 4-bit never uses
    (re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community"), None),
]


class LibraryNoise(logging.Filter):
    """Strips ANSI codes from every record; rewrites or drops the RULES' messages, each said once."""

    def __init__(self):
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = ANSI.sub("", record.getMessage())
        for pattern, say in RULES:
            match = pattern.search(text)
            if match is None:
                continue
            if say is None:
                return False
            text = say(match)
            if text is None or text in self.said:
                return False
            self.said.add(text)
            break
        record.msg, record.args = text, None
        return True


def install(is_main: bool) -> LibraryNoise:
    """The filter on the rank's library handlers (a plain root handler is added when there is none)."""
    noise = LibraryNoise()
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING if is_main else logging.ERROR)
    # transformers prints through its own handler, and with CI=true also propagates to the root's: one record,
    # two lines (the second past the filter, which had already rewritten it). Its handler is enough.
    logging.getLogger("transformers").propagate = False
    for name in ("", "transformers", "DeepSpeed"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(noise)
    return noise
