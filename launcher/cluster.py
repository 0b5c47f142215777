"""Cluster profiles: *where* a recipe runs (the recipe says *what*).

A profile names its backend; each backend's fields live in its own model so a
Slurm profile cannot carry a Ray address by mistake. `--cluster` picks a file;
without one the local profile (this machine) is used.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from launcher.loading import Problem, RecipeError, Source, read_yaml, validate
from launcher.recipe import Strict

BYTES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '141 GB', '512MiB' → bytes. Used for GPU memory, host RAM and disk."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in BYTES:
        raise ValueError(f"{text!r} is not a size; write e.g. 80GiB, 141GB or 512MiB")
    return int(float(match.group(1)) * BYTES[match.group(2).lower()])


MemorySize = Annotated[str, Field(pattern=r"^\s*[0-9]*\.?[0-9]+\s*([KMGT]i?B|[kmgt]i?b|B|b)?\s*$")]


class LocalProfile(Strict):
    backend: Literal["local"] = "local"
    gpu_memory: MemorySize | None = Field(None, description="Memory per GPU for the planner, e.g. 80GiB.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables set for every rank.")


# backend name → its profile schema; a backend registers here and in launcher/backends/<name>.py
PROFILES: dict[str, type[Strict]] = {"local": LocalProfile}


def load_profile(path: Path | None) -> Strict:
    """The profile at path (every problem at once, with YAML lines), or the local default."""
    if path is None:
        return LocalProfile()
    data, lines = read_yaml(Path(path), what="cluster profile")
    source = Source(str(path), lines)
    backend = data.get("backend")
    if backend not in PROFILES:
        close = difflib.get_close_matches(str(backend), PROFILES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        valid = ", ".join(PROFILES)
        raise RecipeError(str(path), [Problem("backend", f"{backend!r} is not a backend{hint}; valid: {valid}",
                                              source.where(("backend",)))])
    return validate(PROFILES[backend], data, source)
