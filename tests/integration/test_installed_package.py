"""What the code loads ships with it: a non-editable install (what a wheel, `pip install .` or a container
image gets) renders a Slurm job script, whose template is package data read through importlib.resources."""

from __future__ import annotations

import shutil
import subprocess
import sys

from helpers import RECIPES, REPO


def test_a_non_editable_install_renders_the_slurm_job_script(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    shutil.copytree(REPO / "launcher", source / "launcher", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(source)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    assert (site / "launcher" / "backends" / "slurm" / "job.sbatch.j2").is_file()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import launcher; print(launcher.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(site)), where.stdout  # not the checkout
    run = subprocess.run(
        [sys.executable, "-m", "launcher.cli", str(RECIPES / "quickstart.yaml"), f"output_dir={tmp_path / 'run'}",
         "train.batch_size=32", "--nodes", "2", "--cluster", str(REPO / "cluster" / "slurm.yaml"), "--dry-run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "#SBATCH --nodes=2" in run.stdout and "-m launcher.cli" in run.stdout
    assert not (tmp_path / "run").exists()
