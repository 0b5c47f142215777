"""Every benchmark runs end to end at its smoke size and prints its table (CI). Benchmarks are not tests:
no timing is asserted, only that each table was printed and its measured quantities came out positive.

The smoke runs start together (they mostly wait on process start-up), each test waits for its own. They take
5–6 minutes of a 2-core machine together, so they are `slow` (`make test-all`), not part of the default suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow

TITLES = {
    "step_overhead": "step overhead: samples/s",
    "startup": "start-up: seconds to the first optimizer step",
    "data": "SFT rows, max_length",
    "memory": "memory per rank (MiB)",
    "gpu": "GPU: ",
    "sft_throughput": "SFT throughput: trained tokens/s",
    "checkpoint": "checkpoint stall under fsdp",
    "eval_memory": "evaluation memory per rank",
}


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    runs = {}
    for name in TITLES:
        out = tmp_path_factory.mktemp(f"bench-{name}")
        runs[name] = (
            subprocess.Popen(
                [sys.executable, "-m", f"bench.{name}", "--smoke", "--out", str(out)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            out,
        )
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(started, name: str) -> tuple[str, dict]:
    proc, out = started[name]
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert TITLES[name] in stdout, stdout
    return stdout, json.loads((out / "result.json").read_text())


def test_step_overhead(started):
    out, result = finished(started, "step_overhead")
    assert "launch ÷ this" in out
    assert all(v > 0 for speeds in result["samples_per_s"].values() for v in speeds)
    assert result["ratio_launch_to_loop"] > 0 and result["ratio_launch_to_trainer"] > 0


def test_startup(started):
    out, result = finished(started, "startup")
    assert "launch --dry-run" in out
    for name, parts in result["median"].items():
        assert parts["time_to_first_step_s"] > 0, name
    cold = result["median"]["launch, cold data"]
    assert cold["recipe_and_plan_s"] > 0 and cold["rank_start_s"] > 0 and cold["first_step_s"] > 0


def test_data(started):
    out, result = finished(started, "data")
    assert all(run["wall_s"] > 0 and run["peak_rss_bytes"] > 0 for run in result["runs"].values())
    assert result["manifest"]["rows"] == 3000 and result["torchrun_cache"]["time_to_first_step_s"] > 0


def test_memory(started):
    out, result = finished(started, "memory")
    ddp = result["strategies"]["ddp"]
    assert all(g > 0 for g in ddp["growth_bytes_per_rank"])
    assert ddp["reference_bytes"] == 16 * result["num_params"]
    assert "loading the weights, host memory per rank" in out
    for strategy in ("ddp", "fsdp"):
        loaded = result["load"]["strategies"][strategy]
        assert loaded["planner_node"] > 0 and len(loaded["growth_bytes_per_rank"]) == result["procs"]


def test_gpu_script_smoke(started):
    out, result = finished(started, "gpu")
    assert result["peak_measured"] > 0 and result["flops_per_token"] > 0
    assert result["runs"]["full"]["results"]["HF Trainer"]["samples_per_s"] > 0
    qlora = result["runs"]["qlora-fsdp"]["adapter_check"]  # QLoRA under fsdp: trained, exported, reloaded
    assert qlora["lora_B_trained"] and qlora["reloaded_logits_finite"] and qlora["max_relative_norm_error"] < 1e-4


def test_sft_throughput_against_trl(started):
    out, result = finished(started, "sft_throughput")
    speeds = result["trained_tokens_per_s"]
    assert set(speeds) == {"launch padded", "launch packed", "TRL padded", "TRL packed"}
    assert all(v > 0 for runs in speeds.values() for v in runs)
    assert all(value > 0 for value in result["ratios"].values())
    padded, packed = result["runs"]["launch padded"][0], result["runs"]["launch packed"][0]
    assert packed["padding_fraction"] < padded["padding_fraction"]  # the skewed rows pad; the bins barely do
    assert packed["trained_tokens"] > padded["trained_tokens"]  # a step of bins holds more rows than a step of rows


def test_checkpoint_stall(started):
    out, result = finished(started, "checkpoint")
    assert "background ÷ synchronous" in out
    assert all(result["saves_s"][mode] and all(t > 0 for t in result["saves_s"][mode]) for mode in result["saves_s"])


def test_eval_memory(started):
    _, result = finished(started, "eval_memory")
    assert all(case["same_metrics"] for case in result["cases"])
    assert all(new < old for case in result["cases"] for new, old in [case["gathered_bytes"]])
