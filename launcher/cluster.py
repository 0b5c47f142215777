"""Cluster profiles: *where* a recipe runs (the recipe says *what*).

A profile names its backend; each backend's fields live in its own model so a
Slurm profile cannot carry a Ray address by mistake. `--cluster` picks a file;
without one the local profile (this machine) is used.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

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


class RayProfile(Strict):
    """A Ray cluster: Ray Train starts one worker per GPU (or cpu_workers_per_node CPU workers) on each node."""

    backend: Literal["ray"]
    address: str = Field("local", description="'local' starts a private one-node Ray for this run; otherwise a "
                         "running cluster: 'auto', 'HOST:6379' (its GCS) or 'ray://HOST:10001' (Ray Client).")
    dashboard: str | None = Field(None, description="Ray Jobs address for --submit, e.g. http://HOST:8265.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node, one worker each; 0 trains on CPU workers.")
    gpu_memory: MemorySize | None = Field(None, description="Memory per GPU for the planner, e.g. 80GiB.")
    cpu_workers_per_node: int = Field(1, ge=1, description="Workers per node when gpus_per_node is 0 "
                                      "(--procs overrides it).")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs Ray reserves per worker; also its OMP_NUM_THREADS.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy; STRICT_SPREAD puts every worker on its own node.")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of the job: "
                                        "working_dir, pip, env_vars, ... (docs.ray.io, 'runtime environments').")
    storage_path: str | None = Field(None, description="Where Ray keeps the checkpoints it restarts from: a "
                                     "shared filesystem or s3://, gs://. Default: OUTPUT_DIR/ray.")
    max_failures: int = Field(2, ge=-1, description="Restarts of the worker group after a worker or node failure "
                              "(-1: no limit).")
    object_store_memory: MemorySize = Field("512MiB", description="Object store of the private cluster "
                                            "(address: local); Ray's default is 30% of RAM.")
    auth: Literal["token", "disabled"] = Field("token", description="Ray token authentication (on by default "
                                               "for `ray start --head` in Ray 2.60): RAY_AUTH_MODE for the "
                                               "driver; the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                                               "or ~/.ray/auth_token.")


# backend name → its profile schema; a backend registers here and in launcher/backends/<name>.py
PROFILES: dict[str, type[Strict]] = {"local": LocalProfile, "ray": RayProfile}


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
