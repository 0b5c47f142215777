"""Cluster profiles: *where* a recipe runs (the recipe says *what*).

A profile names its backend; each backend's fields live in its own model so a
Slurm profile cannot carry a Ray address by mistake. `find_profile` looks for one
the way users expect (`--cluster`, `LAUNCHER_CLUSTER`, the per-user default file,
then a cluster this machine belongs to) and says which it took and why.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from launcher.config.loading import Source, read_yaml, validate
from launcher.config.recipe import MemorySize
from launcher.config.strict import FREE_TEXT, Strict
from launcher.errors import Problem, ProfileError, UsageError

BYTES = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'80GiB', '141 GB', '512MiB' → bytes. Used for GPU memory, host RAM and disk."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in BYTES:
        raise ValueError(f"{text!r} is not a size; write e.g. 80GiB, 141GB or 512MiB")
    return int(float(match.group(1)) * BYTES[match.group(2).lower()])


PEAK_TFLOPS_HELP = (
    "Peak dense bf16 TFLOP/s per GPU, the denominator of MFU; default: the datasheet figure for the GPU's name "
    "(launcher/planning/flops.py: PEAK_TFLOPS)."
)


class LocalProfile(Strict):
    backend: Literal["local"] = "local"
    gpu_memory: MemorySize | None = Field(None, description="Memory per GPU for the planner, e.g. 80GiB.")
    peak_tflops: float | None = Field(None, gt=0, description=PEAK_TFLOPS_HELP)
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables set for every rank.")


# The syntax of what a Slurm profile writes into the job script, checked before anything is written (every
# string is also one line of printable text: strict.Strict). Values are quoted there as well (backends/slurm).
SYNTAX = {
    "name": (r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", "a Slurm name (letters, digits, _ . + -)"),
    "names": (r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(,[A-Za-z0-9_][A-Za-z0-9_.+-]*)*", "Slurm names, comma-separated"),
    "features": (r"[A-Za-z0-9_.,&|*!()\[\]:=+-]+", "Slurm features joined by & | , [ ] * (no spaces)"),
    "time": (
        r"(\d+|\d+:\d{1,2}(:\d{1,2})?|\d+-\d{1,2}(:\d{1,2}){0,2}|(?i:unlimited|infinite))",
        "a Slurm time: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED",
    ),
    "variable": (r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name (letters, digits, _; not a digit first)"),
    "word": (r"[^\s-]\S*", "one word, not an option (no spaces, not starting with -)"),
    "mount": (r"[^\s,]+", "SRC:DST[:FLAGS] without spaces or commas (mounts are joined with commas)"),
    "option": (r"-\S.*", "an sbatch option, e.g. --exclusive"),
}


def syntax_problem(value: str, kind: str) -> str | None:
    """Why `value` is not of the syntax `kind` (SYNTAX), or None."""
    pattern, what = SYNTAX[kind]
    return None if re.fullmatch(pattern, value) else f"{value!r} is not {what}"


def _checked(kind: str, value):
    """`value` (a string, a list of them, a dict's keys, or None) if of syntax `kind`; else ValueError."""
    for text in [] if value is None else [value] if isinstance(value, str) else value:
        problem = syntax_problem(text, kind)
        if problem:
            raise ValueError(problem)
    return value


# SlurmProfile field → its syntax
FIELD_SYNTAX = {
    "partition": "names",
    "account": "name",
    "qos": "name",
    "constraint": "features",
    "time": "time",
    "env": "variable",
    "secret_env": "variable",
    "modules": "word",
    "extra_sbatch": "option",
}


# Never written anywhere, whatever the profile says: passed from the submitting environment only.
ALWAYS_SECRET = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


class RayProfile(Strict):
    """A Ray cluster: Ray Train starts one worker per GPU (or cpu_workers_per_node CPU workers) on each node."""

    backend: Literal["ray"]
    address: str = Field(
        "local",
        description="'local' starts a private one-node Ray for this run; otherwise a "
        "running cluster: 'auto', 'HOST:6379' (its GCS) or 'ray://HOST:10001' (Ray Client).",
    )
    dashboard: str | None = Field(None, description="Ray Jobs address for --submit, e.g. http://HOST:8265.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node, one worker each; 0 trains on CPU workers.")
    gpu_memory: MemorySize | None = Field(None, description="Memory per GPU for the planner, e.g. 80GiB.")
    peak_tflops: float | None = Field(None, gt=0, description=PEAK_TFLOPS_HELP)
    cpu_workers_per_node: int = Field(
        1, ge=1, description="Workers per node when gpus_per_node is 0 (--procs overrides it)."
    )
    cpus_per_worker: int = Field(1, ge=1, description="CPUs Ray reserves per worker; also its OMP_NUM_THREADS.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy; STRICT_SPREAD puts every worker on its own node."
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray runtime_env of the job: "
        "working_dir, pip, env_vars, ... (docs.ray.io, 'runtime environments').",
    )
    storage_path: str | None = Field(
        None,
        description="Where Ray keeps the checkpoints it restarts from: a "
        "shared filesystem or s3://, gs://. Default: OUTPUT_DIR/ray.",
    )
    max_failures: int = Field(
        2, ge=-1, description="Restarts of the worker group after a worker or node failure (-1: no limit)."
    )
    object_store_memory: MemorySize = Field(
        "512MiB", description="Object store of the private cluster (address: local); Ray's default is 30% of RAM."
    )
    secret_env: list[str] = Field(
        default_factory=list,
        description="Names of variables the workers get from the driver's environment through the object "
        f"store, never in a runtime_env, which Ray records ({', '.join(ALWAYS_SECRET)} always are).",
    )
    auth: Literal["token", "disabled"] = Field(
        "token",
        description="Ray token authentication (on by default "
        "for `ray start --head` in Ray 2.60): RAY_AUTH_MODE for the "
        "driver; the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
        "or ~/.ray/auth_token.",
    )

    @field_validator("secret_env")
    @classmethod
    def _secret_names(cls, value):
        return _checked("variable", value)

    @model_validator(mode="after")
    def _secrets_stay_out_of_ray_state(self):
        env_vars = self.runtime_env.get("env_vars") or {}
        leaked = sorted(set(env_vars) & (set(self.secret_env) | set(ALWAYS_SECRET)))
        if leaked:
            raise ValueError(
                f"runtime_env.env_vars must not hold secrets ({', '.join(leaked)}): Ray records a runtime_env in "
                "its state (State API, dashboard, export events); export them in the shell that runs `launch` "
                "(and list them in secret_env): the workers get them through the object store"
            )
        return self


class Container(Strict):
    image: str = Field(description="Image for every rank, started by srun (pyxis/enroot: --container-image).")
    mounts: list[str] = Field(
        default_factory=list,
        description="SRC:DST mounts (--container-mounts); the run directory must be reachable at the same path inside.",
    )

    @field_validator("image", "mounts")
    @classmethod
    def _container_syntax(cls, value, info: ValidationInfo):
        return _checked("word" if info.field_name == "image" else "mount", value)


class SlurmProfile(Strict):
    backend: Literal["slurm"] = "slurm"
    partition: str | None = Field(None, description="#SBATCH --partition; default: the cluster's default.")
    account: str | None = Field(None, description="#SBATCH --account.")
    qos: str | None = Field(None, description="#SBATCH --qos.")
    time: str = Field(
        "04:00:00",
        description="Time limit per run of the job (#SBATCH --time); the ranks "
        "checkpoint `signal_grace` before it and the job requeues itself.",
    )
    constraint: str | None = Field(None, description="#SBATCH --constraint, e.g. h100.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node, one rank each; 0 = CPU ranks (gloo).")
    procs_per_node: int = Field(1, ge=1, description="CPU ranks per node when gpus_per_node is 0.")
    gpu_memory: MemorySize | None = Field(None, description="Memory per GPU for the planner, e.g. 80GiB.")
    peak_tflops: float | None = Field(None, gt=0, description=PEAK_TFLOPS_HELP)
    cpus_per_task: int | None = Field(
        None, ge=1, description="#SBATCH --cpus-per-task: cores per node agent (shared by its ranks)."
    )
    mem: MemorySize | None = Field(None, description="#SBATCH --mem per node, e.g. 200GB.")
    requeue: bool = Field(True, description="On a stop signal (preemption, time limit) checkpoint and requeue.")
    signal_grace: int = Field(120, ge=10, description="Seconds before the time limit at which Slurm sends USR1.")
    extra_sbatch: list[str] = Field(default_factory=list, description="More #SBATCH lines, e.g. '--exclusive'.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment set in the job script (not secret: it is written into the script).",
    )
    secret_env: list[str] = Field(
        default_factory=list,
        description="Names of variables passed from the submitting "
        f"environment, never written to a file ({', '.join(ALWAYS_SECRET)} always are).",
    )
    modules: list[str] = Field(default_factory=list, description="`module load` these before anything else.")
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run in the job before the ranks start: the one field that is code.",
        json_schema_extra=FREE_TEXT,
    )
    container: Container | None = Field(None, description="Run the ranks in a container (pyxis).")
    python: str | None = Field(None, description="Python on the compute nodes; default: the one running `launch`.")

    @field_validator(*FIELD_SYNTAX)
    @classmethod
    def _slurm_syntax(cls, value, info: ValidationInfo):
        """What reaches the job script in the syntax Slurm (or the shell) gives it; env: its names."""
        return _checked(FIELD_SYNTAX[info.field_name], value)

    @model_validator(mode="after")
    def _secrets_stay_out_of_files(self):
        leaked = sorted(set(self.env) & (set(self.secret_env) | set(ALWAYS_SECRET)))
        if leaked:
            raise ValueError(
                f"env must not hold secrets ({', '.join(leaked)}): the job script would contain them; "
                "export them in the shell that runs `launch` (and list them in secret_env)"
            )
        return self


# backend name → its profile schema; a backend registers here and in launcher/backends/<name>.py
PROFILES: dict[str, type[Strict]] = {"local": LocalProfile, "slurm": SlurmProfile, "ray": RayProfile}


def load_profile(path: Path | None) -> Strict:
    """The profile at path (every problem at once, with YAML lines); without one, what find_profile finds for
    one node (a launch of several nodes asks find_profile itself)."""
    if path is None:
        return find_profile(None).profile
    data, lines = read_yaml(Path(path), what="cluster profile", error=ProfileError)
    source = Source(str(path), lines)
    backend = data.get("backend")
    if not isinstance(backend, str) or backend not in PROFILES:
        close = difflib.get_close_matches(str(backend), PROFILES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        valid = ", ".join(PROFILES)
        raise ProfileError(
            str(path),
            [Problem("backend", f"{backend!r} is not a backend{hint}; valid: {valid}", source.where(("backend",)))],
        )
    return validate(PROFILES[backend], data, source, error=ProfileError)


# ----------------------------------------------------------------------------- which profile
ENV_PROFILE = "LAUNCHER_CLUSTER"  # a profile file for every launch of this shell (a site's module can set it)
WAYS = (
    "--cluster FILE",
    f"{ENV_PROFILE}=FILE",
    "a default profile in $XDG_CONFIG_HOME/launcher/cluster.yaml (~/.config/launcher/cluster.yaml)",
    "a cluster this machine belongs to (RAY_ADDRESS set: that Ray cluster; sbatch on PATH: Slurm)",
)


@dataclass(frozen=True)
class FoundProfile:
    """The profile a launch uses and why (the plan shows `source`)."""

    profile: Strict
    source: str
    path: Path | None = None  # the file it was read from (None: built from defaults or detection)


def user_profile_path(environ=os.environ) -> Path:
    """The per-user default profile, XDG-aware: $XDG_CONFIG_HOME/launcher/cluster.yaml, else ~/.config/..."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(base) / "launcher" / "cluster.yaml"


def find_profile(path: Path | None, nodes: int = 1, environ=os.environ) -> FoundProfile:
    """The profile of this launch: `--cluster`, else LAUNCHER_CLUSTER, else the per-user default file, else
    (inside a Slurm allocation) Slurm, else, when more than one node is asked for, a detected cluster:
    RAY_ADDRESS → that Ray cluster, sbatch on PATH → Slurm with the site's defaults. One node and nothing
    found: this machine. More nodes and nothing found: a UsageError naming every way to give one."""
    if path is not None:
        return FoundProfile(load_profile(path), f"{path} (--cluster)", Path(path))
    named = environ.get(ENV_PROFILE)
    if named:
        if not _is_file(Path(named)):
            raise ProfileError(ENV_PROFILE, [Problem(ENV_PROFILE, f"{named} is not a file; point it at a profile")])
        return FoundProfile(load_profile(Path(named)), f"{named} ({ENV_PROFILE})", Path(named))
    default = user_profile_path(environ)
    if _is_file(default):
        return FoundProfile(load_profile(default), f"{default} (your default profile)", default)
    if environ.get("SLURM_JOB_ID"):  # srun in salloc, or your own sbatch script
        return FoundProfile(SlurmProfile(), f"slurm (inside Slurm job {environ['SLURM_JOB_ID']})")
    if nodes > 1:
        address = environ.get("RAY_ADDRESS")
        if address:
            if address.startswith(("http://", "https://")):  # a Ray Jobs address: --submit goes there
                profile = RayProfile(backend="ray", address="auto", dashboard=address)
            else:
                profile = RayProfile(backend="ray", address=address)
            return FoundProfile(profile, f"ray at {address} (detected: RAY_ADDRESS is set; Ray's defaults)")
        if shutil.which("sbatch", path=environ.get("PATH")):
            gpus = site_gpus_per_node(environ)
            what = f"{gpus} GPUs per node from sinfo" if gpus else "CPU ranks: sinfo shows no GPUs"
            return FoundProfile(
                SlurmProfile(gpus_per_node=gpus),
                f"slurm (detected: sbatch on PATH; the site's default partition, time and account, {what})",
            )
        raise UsageError.one(
            "--nodes",
            f"{nodes} nodes need a cluster profile, and none was found; give one with "
            + "; or ".join(WAYS)
            + " (examples: cluster/slurm.yaml, cluster/slurm-cpu.yaml, cluster/ray.yaml)",
        )
    return FoundProfile(LocalProfile(), "local (this machine; no cluster profile given or found)")


def _is_file(path: Path) -> bool:
    """False also when the path cannot be looked at (a HOME that is not this user's: permission denied)."""
    try:
        return path.is_file()
    except OSError:
        return False


def site_gpus_per_node(environ=os.environ) -> int:
    """GPUs per node of the site's default partition, from `sinfo` (gres gpu:N or gpu:TYPE:N); 0 when none or
    when sinfo cannot tell."""
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--format=%P %G"], capture_output=True, text=True, timeout=20, env=dict(environ)
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return gpus_from_sinfo(out)


def gpus_from_sinfo(text: str) -> int:
    """`sinfo --format='%P %G'` → the GPUs per node of the default partition (marked *; else any)."""
    rows = [line.split(None, 1) for line in text.splitlines() if line.strip()]
    default = [gres for part, *gres in rows if part.endswith("*")] or [gres for _, *gres in rows]
    counts = [int(m.group(1)) for gres in default for m in re.finditer(r"gpu(?::[\w-]+)?:(\d+)", " ".join(gres))]
    return max(counts, default=0)
