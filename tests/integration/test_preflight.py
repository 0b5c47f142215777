"""Pre-flight checks (launcher/train/preflight.py): real ranks through the real `launch`, 2 local gloo ranks,
and a real failure: an output_dir on a 2 MiB tmpfs. The Slurm case is tests/cluster/test_preflight_slurm.py;
the verdict's arithmetic (tournament rounds, a slow node among four) tests/unit/test_preflight_verdict.py.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from helpers import RECIPES, launch, preflight_recipe, preflight_report

from launcher.train.preflight import PROBE


def test_bad_preflight_settings_are_refused_before_any_rank_starts(tmp_path):
    run = launch(
        "preflight",
        RECIPES / "quickstart.yaml",
        f"output_dir={tmp_path}",
        "preflight.allreduce_size=lots",
        "preflight.slow_node_factor=2",
    )
    assert run.returncode == 2, run.output[-3000:]
    assert "preflight.allreduce_size" in run.stderr and "preflight.slow_node_factor" in run.stderr
    assert not (tmp_path / "launch").exists()


def test_local_preflight_two_ranks_reports_bandwidth_and_leaves_nothing_behind(tiny, tmp_path):
    out = tmp_path / "run"
    run = launch(
        "preflight", *preflight_recipe(tiny["bert"], out, "preflight.allreduce_size=2MiB"), "--procs", "2", timeout=300
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "pre-flight: 2 ranks" in run.stdout and "pre-flight passed" in run.stdout
    assert "no node pairs" in run.stdout
    r = preflight_report(out)
    assert r["status"] == "passed" and r["world_size"] == 2 and len(r["ranks"]) == 2
    assert r["allreduce"]["bytes"] == 2 * 2**20 and r["allreduce"]["bus_bandwidth_GBps"] > 0 and r["node_pairs"] == []
    (node,) = r["nodes"]
    assert node["node"] == socket.gethostname() and node["ranks"] == [0, 1] and node["ok"]
    assert 0 < node["disk_needed"] < node["disk_free"] and 0 < node["ram_needed"] < node["ram_free"]
    assert r["ranks"][0]["versions"]["launcher"] and r["ranks"][0]["versions"] == r["ranks"][1]["versions"]
    assert not list(out.glob(f"{PROBE}*")), "probe files removed"
    assert not (out / "summary.json").exists() and not list(out.glob("checkpoint-*")), "the ranks only checked"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode:  # root in a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_training_stops_before_loading_when_output_dir_has_too_little_disk(tiny, tiny_tmpfs):
    """A training launch (not `launch preflight`) passes through the checks: on a 2 MiB output_dir
    every rank stops before the model is loaded, and the message names the node, need and have."""
    run = launch(*preflight_recipe(tiny["bert"], tiny_tmpfs), "--procs", "2", timeout=300)
    assert run.returncode == 1, run.output[-4000:]
    host = socket.gethostname()
    assert f"node {host}: free disk at output_dir 2 MiB, the run needs" in run.stderr, run.stderr[-3000:]
    assert "rank 0" in run.stderr and "rank 1" in run.stderr, "every rank stopped"
    r = preflight_report(tiny_tmpfs)
    assert r["status"] == "failed" and r["nodes"][0]["disk_needed"] > 2 * 2**20 > r["nodes"][0]["disk_free"]
    assert not (tiny_tmpfs / "metrics.jsonl").exists() and not list(tiny_tmpfs.glob("checkpoint-*"))
