"""The typed view of the SLURM_* environment, and a job's end mapped to the exit status of `launch` (the job
script itself: tests/integration/test_slurm_script.py; real jobs: tests/cluster/test_slurm_jobs.py)."""

from __future__ import annotations

import pytest

from launcher.backends.slurm import SlurmEnvironment
from launcher.backends.slurm.jobs import exit_status


def test_slurm_environment_view():
    assert SlurmEnvironment.detect({}) is None
    batch = SlurmEnvironment.detect(
        {"SLURM_JOB_ID": "31337", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NODEID": "0"}
    )
    assert batch.node_id is None and batch.num_nodes == 4 and batch.restart_count == 0
    step = SlurmEnvironment.detect(
        {
            "SLURM_JOB_ID": "31337",
            "SLURM_JOB_NUM_NODES": "4",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": "gpu[01-04]",
            "SLURM_NODEID": "2",
            "SLURM_RESTART_COUNT": "3",
        }
    )
    assert step.node_id == 2 and step.restart_count == 3
    assert step.rendezvous_port == 15000 + 31337 % 15000 < 32768


@pytest.mark.parametrize(
    "state,code,expected",
    [
        ("COMPLETED", "0:0", 0),
        ("FAILED", "1:0", 1),
        ("FAILED", "143:0", 1),
        ("NODE_FAIL", "0:0", 1),
        ("CANCELLED", "0:15", 143),
        ("TIMEOUT", "0:1", 143),
    ],
)
def test_job_end_maps_to_launch_exit_status(state, code, expected):
    assert exit_status({"JobState": state, "ExitCode": code}) == expected
