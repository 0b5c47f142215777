"""The sbatch script `launch --dry-run` prints for Slurm profiles, against golden files; profile errors.
No cluster needed.

Regenerate the golden files after an intended template change with UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import RECIPES, REPO, launch

GOLDEN = REPO / "tests" / "slurm" / "golden"
SECRETS = {"HF_TOKEN": "hf_golden_secret_value", "WANDB_API_KEY": "wandb-golden-secret", "MY_TOKEN": "my-golden-secret"}

PROFILES = {
    # the shipped example: 8 GPUs per node, account, constraint, extra lines, setup, secrets by name
    "gpus": REPO / "cluster" / "slurm.yaml",
    "container": {
        "backend": "slurm",
        "partition": "batch",
        "qos": "high",
        "time": "2-00:00:00",
        "gpus_per_node": 4,
        "gpu_memory": "141GB",
        "container": {"image": "nvcr.io/nvidia/pytorch:24.10-py3", "mounts": ["/lustre:/lustre", "/home/me:/home/me"]},
        "modules": ["cuda/12.4", "nccl"],
        "secret_env": ["MY_TOKEN"],
        "python": "python3",
    },
    "cpu": {
        "backend": "slurm",
        "procs_per_node": 2,
        "cpus_per_task": 8,
        "mem": "16 GiB",
        "requeue": False,
        "extra_sbatch": ["--mail-type=END,FAIL", "--exclude=node13"],
        "env": {"OMP_NUM_THREADS": "4", "GREETING": "two words; $not_expanded"},
        "setup": ["ulimit -n 65536"],
        "python": "/opt/venv/bin/python",
    },
}
NODES = {"gpus": 4, "container": 2, "cpu": 3}


def dry_run(name: str, tmp_path: Path):
    profile = PROFILES[name]
    if isinstance(profile, dict):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(profile))
        profile = path
    out = tmp_path / f"golden-{name}"
    result = launch(
        RECIPES / "quickstart.yaml",
        "--nodes",
        NODES[name],
        "--cluster",
        profile,
        "--dry-run",
        f"output_dir={out}",
        "train.batch_size=96",
        env=SECRETS,
    )
    return result, out


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_dry_run_prints_the_golden_script_and_writes_nothing(name, tmp_path):
    result, out = dry_run(name, tmp_path)
    assert result.returncode == 0, result.output
    script = result.stdout[result.stdout.index(f"# {out}/job.sbatch") :]
    script = script.replace(str(tmp_path), "/RUNS").replace(sys.executable, "PYTHON")
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()
    assert not out.exists(), "--dry-run writes nothing"
    for value in SECRETS.values():
        assert value not in result.output


def test_golden_scripts_have_the_promised_defaults():
    gpu = (GOLDEN / "gpus.sbatch").read_text()
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@180",
        "#SBATCH --open-mode=append",
        "#SBATCH --exclusive",
        "--kill-on-bad-exit=1",
        "--wait=60",
    ]:
        assert line in gpu
    container = (GOLDEN / "container.sbatch").read_text()
    assert (
        "--container-image=nvcr.io/nvidia/pytorch:24.10-py3 --container-mounts=/lustre:/lustre,/home/me:/home/me"
        in container
        and "module load cuda/12.4" in container
        and "MY_TOKEN" not in container
    )
    cpu = (GOLDEN / "cpu.sbatch").read_text()
    assert "#SBATCH --no-requeue" in cpu and "--signal" not in cpu and "trap '" not in cpu
    assert "#SBATCH --mem=16384M" in cpu
    assert "export GREETING='two words; $not_expanded'" in cpu


def test_a_secret_in_the_profile_env_is_refused(tmp_path):
    path = tmp_path / "leaky.yaml"
    path.write_text("backend: slurm\nenv:\n  WANDB_API_KEY: abc\n")
    result = launch(RECIPES / "quickstart.yaml", "--cluster", path, "--dry-run")
    assert result.returncode == 2
    assert "must not hold secrets (WANDB_API_KEY)" in result.stderr and "abc" not in result.output


def test_local_profile_in_a_multinode_slurm_step_is_refused(tmp_path):
    """Each node would run its own standalone world and train alone."""
    path = tmp_path / "local.yaml"
    path.write_text("backend: local\n")
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    result = launch(RECIPES / "quickstart.yaml", "--cluster", path, "--dry-run", env=env)
    assert result.returncode == 2 and "a step of a multi-node Slurm job" in result.stderr, result.output
