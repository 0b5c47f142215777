"""Pre-flight checks on the session's Slurm testbed (nodes n1, n2): a node whose `launcher` differs (a
PYTHONPATH entry holding another version, on n2 only) stops the job (local runs: tests/integration/test_preflight.py,
the verdict's arithmetic: tests/unit/test_preflight_verdict.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml
from helpers import REPO, launch, preflight_recipe, preflight_report


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
        *preflight_recipe(tiny["bert"], out),
        "--nodes",
        "2",
        "--cluster",
        slurm_profile(tmp_path, str(python), procs_per_node=2),
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.output[-4000:]
    assert "versions differ between ranks (launcher; nodes n2 differ from rank 0)" in run.output, run.output[-4000:]
    r = preflight_report(out)
    assert r["status"] == "failed" and [n["versions_ok"] for n in r["nodes"]] == [True, False]
    by_host = {group["host"]: group for group in r["version_mismatch"]}
    assert set(by_host["n2"]) == {"host", "ranks", "launcher"} and by_host["n2"]["launcher"].startswith("0.0.1-stale+")
    assert r["allreduce"]["ranks"] == 4 and r["allreduce"]["bus_bandwidth_GBps"] > 0
    assert [(n["node"], sorted(n["ranks"])) for n in r["nodes"]] == [("n1", [0, 1]), ("n2", [2, 3])]
    (pair,) = r["node_pairs"]
    assert pair["nodes"] == ["n1", "n2"] and pair["bus_bandwidth_GBps"] > 0 and r["slowest_pair"] == ["n1", "n2"]
    assert all(n["shared_fs_ok"] for n in r["nodes"])
