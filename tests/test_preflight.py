"""Pre-flight checks (launcher/preflight.py): real ranks through the real `launch`, locally (2 gloo ranks)
and on the session's Slurm testbed (nodes n1, n2); real failures: a node whose `launcher` differs
(a PYTHONPATH entry holding another version, on n2 only) and an output_dir on a 2 MiB tmpfs.
The verdict's arithmetic (tournament rounds, a slow node among four) is checked on its pure function.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import yaml
from conftest import RECIPES, REPO, launch

from launcher.train.preflight import PROBE, REPORT, evaluate, rounds


def tiny_recipe(model: str, out: Path, *extra: str) -> list:
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


def report(out: Path) -> dict:
    return json.loads((out / REPORT).read_text())


@pytest.mark.parametrize("num_nodes", [2, 3, 4, 7, 8])
def test_rounds_meet_every_pair_once_without_a_node_twice_in_a_round(num_nodes):
    schedule = rounds(num_nodes)
    assert len(schedule) == num_nodes - 1 + num_nodes % 2
    for pairs in schedule:
        met = [node for pair in pairs for node in pair]
        assert len(met) == len(set(met))
    assert sorted(pair for pairs in schedule for pair in pairs) == list(combinations(range(num_nodes), 2))


def _facts(rank: int, host: str, pairs: dict, **versions) -> dict:
    return {
        "rank": rank,
        "host": host,
        "pairs": pairs,
        "versions": {"python": "3.11.7", "torch": "2.13.0", **versions},
        "shared_fs": {"ok": True, "token": "t", "error": None},
        "node_probe": None,
        "ram_free": 8 * 2**30,
        "disk_free": 100 * 2**30,
    }


def test_a_node_far_below_the_median_pair_is_named_with_what_to_do():
    gb = 1e9
    bw = {
        ("a", "b"): 10 * gb,
        ("a", "c"): 10 * gb,
        ("b", "c"): 10 * gb,
        ("a", "d"): 1 * gb,
        ("b", "d"): 1.2 * gb,
        ("c", "d"): 0.9 * gb,
    }
    facts = [
        _facts(r, h, {o: v for (x, o), v in bw.items() if x == h} | {x: v for (x, o), v in bw.items() if o == h})
        for r, h in enumerate("abcd")
    ]
    verdict = evaluate(facts, 5 * gb, 2**20, {"ram": 2**30, "disk": 2**30, "why_not": None}, 0.25, "t")
    assert verdict["status"] == "failed" and len(verdict["failures"]) == 1, verdict["failures"]
    assert verdict["failures"][0].startswith("node d:") and "exclude it" in verdict["failures"][0]
    assert verdict["slowest_pair"] == ["c", "d"]
    assert [row["ok"] for row in verdict["nodes"]] == [True, True, True, False]
    assert verdict["nodes"][3]["bus_bandwidth_GBps"] == 1.0  # its median pair


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
        "preflight", *tiny_recipe(tiny["bert"], out, "preflight.allreduce_size=2MiB"), "--procs", "2", timeout=300
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "pre-flight: 2 ranks" in run.stdout and "pre-flight passed" in run.stdout
    assert "no node pairs" in run.stdout
    r = report(out)
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
    run = launch(*tiny_recipe(tiny["bert"], tiny_tmpfs), "--procs", "2", timeout=300)
    assert run.returncode == 1, run.output[-4000:]
    host = socket.gethostname()
    assert f"node {host}: free disk at output_dir 2 MiB, the run needs" in run.stderr, run.stderr[-3000:]
    assert "rank 0" in run.stderr and "rank 1" in run.stderr, "every rank stopped"
    r = report(tiny_tmpfs)
    assert r["status"] == "failed" and r["nodes"][0]["disk_needed"] > 2 * 2**20 > r["nodes"][0]["disk_free"]
    assert not (tiny_tmpfs / "metrics.jsonl").exists() and not list(tiny_tmpfs.glob("checkpoint-*"))


def slurm_profile(folder: Path, python: str | None = None, procs_per_node: int = 1) -> Path:
    path = folder / "slurm-cpu.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "backend": "slurm",
                "time": "00:10:00",
                "procs_per_node": procs_per_node,
                "env": {"OMP_NUM_THREADS": "1"},
                **({"python": python} if python else {}),
            }
        )
    )
    return path


def test_slurm_node_with_another_launcher_version_stops_the_job(slurm_cluster, tiny, tmp_path):
    """2 nodes x 2 ranks, and n2's ranks import a copy of launcher whose version differs (a stale install on
    one node): the job fails before loading, naming n2 and only the differing column. The other checks still
    ran: the first rank of each node measured the pair (the others stayed out of it), and the file system is
    shared."""
    other = tmp_path / "other-env"
    shutil.copytree(REPO / "launcher", other / "launcher", ignore=shutil.ignore_patterns("__pycache__"))
    init = other / "launcher" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "0.0.1-stale+'))
    python = tmp_path / "python-per-node"
    python.write_text(
        f'#!/bin/bash\nif [ "$(hostname)" = n2 ]; then export PYTHONPATH={other}${{PYTHONPATH:+:$PYTHONPATH}}; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    out = tmp_path / "run"
    # run from tmp_path: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    run = launch(
        "preflight",
        *tiny_recipe(tiny["bert"], out),
        "--nodes",
        "2",
        "--cluster",
        slurm_profile(tmp_path, str(python), procs_per_node=2),
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.output[-4000:]
    assert "versions differ between ranks (launcher; nodes n2 differ from rank 0)" in run.output, run.output[-4000:]
    r = report(out)
    assert r["status"] == "failed" and [n["versions_ok"] for n in r["nodes"]] == [True, False]
    by_host = {group["host"]: group for group in r["version_mismatch"]}
    assert set(by_host["n2"]) == {"host", "ranks", "launcher"} and by_host["n2"]["launcher"].startswith("0.0.1-stale+")
    assert r["allreduce"]["ranks"] == 4 and r["allreduce"]["bus_bandwidth_GBps"] > 0
    assert [(n["node"], sorted(n["ranks"])) for n in r["nodes"]] == [("n1", [0, 1]), ("n2", [2, 3])]
    (pair,) = r["node_pairs"]
    assert pair["nodes"] == ["n1", "n2"] and pair["bus_bandwidth_GBps"] > 0 and r["slowest_pair"] == ["n1", "n2"]
    assert all(n["shared_fs_ok"] for n in r["nodes"])
