"""Which cluster profile a launch uses (config.cluster.find_profile): --cluster, LAUNCHER_CLUSTER, the per-user
default (XDG-aware), a Slurm allocation, then detection for several nodes; the error names every way."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from launcher.config.cluster import RayProfile, SlurmProfile, find_profile, gpus_from_sinfo, user_profile_path
from launcher.errors import ProfileError, UsageError

RAY = "backend: ray\naddress: auto\n"
SLURM = "backend: slurm\npartition: cpu\n"


def environ(tmp_path: Path, **more: str) -> dict:
    """A bare environment: no profile variables, an empty config folder, a PATH without sbatch."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    return {"HOME": str(tmp_path / "home"), "PATH": str(tmp_path / "bin"), **more}


def test_the_order_cluster_flag_then_variable_then_user_default(tmp_path):
    flag, named, default = tmp_path / "flag.yaml", tmp_path / "named.yaml", tmp_path / "cfg/launcher/cluster.yaml"
    flag.write_text(SLURM)
    named.write_text(RAY)
    default.parent.mkdir(parents=True)
    default.write_text("backend: local\ngpu_memory: 24GiB\n")
    env = environ(tmp_path, LAUNCHER_CLUSTER=str(named), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    found = find_profile(flag, 4, env)
    assert isinstance(found.profile, SlurmProfile) and found.source == f"{flag} (--cluster)" and found.path == flag
    found = find_profile(None, 4, env)
    assert isinstance(found.profile, RayProfile) and "(LAUNCHER_CLUSTER)" in found.source and found.path == named
    del env["LAUNCHER_CLUSTER"]
    found = find_profile(None, 1, env)
    assert found.profile.gpu_memory == "24GiB" and found.source == f"{default} (your default profile)"


def test_the_user_default_follows_xdg_config_home_else_home():
    assert user_profile_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/launcher/cluster.yaml")
    assert user_profile_path({"HOME": "/h"}) == Path("/h/.config/launcher/cluster.yaml")


def test_several_nodes_detect_ray_from_ray_address_then_slurm_from_sbatch_on_path(tmp_path):
    sbatch = tmp_path / "bin" / "sbatch"
    env = environ(tmp_path, RAY_ADDRESS="10.0.0.1:6379")
    sbatch.write_text("#!/bin/sh\nexit 1\n")  # present on PATH is what detection asks; it is never run
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    found = find_profile(None, 2, env)
    assert found.profile.backend == "ray" and found.profile.address == "10.0.0.1:6379"
    assert "RAY_ADDRESS" in found.source and found.path is None
    jobs = find_profile(None, 2, {**env, "RAY_ADDRESS": "http://head:8265"}).profile
    assert jobs.dashboard == "http://head:8265" and jobs.address == "auto"
    del env["RAY_ADDRESS"]
    found = find_profile(None, 2, env)
    assert found.profile.backend == "slurm" and "sbatch on PATH" in found.source
    assert found.profile.partition is None, "the site's default partition"
    assert find_profile(None, 1, env).profile.backend == "local", "one node without a profile: this machine"


def test_nothing_found_for_several_nodes_names_every_way(tmp_path):
    with pytest.raises(UsageError) as caught:
        find_profile(None, 4, environ(tmp_path))
    message = str(caught.value)
    for way in ("--cluster FILE", "LAUNCHER_CLUSTER=FILE", "~/.config/launcher/cluster.yaml", "RAY_ADDRESS", "sbatch"):
        assert way in message, way


def test_a_launcher_cluster_that_is_not_a_file_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="LAUNCHER_CLUSTER"):
        find_profile(None, 1, environ(tmp_path, LAUNCHER_CLUSTER=str(tmp_path / "missing.yaml")))


def test_gpus_per_node_of_the_default_partition_from_sinfo():
    text = "debug* (null)\ngpu gpu:h100:8(S:0-1)\n"
    assert gpus_from_sinfo(text) == 0
    assert gpus_from_sinfo("gpu* gpu:h100:8(S:0-1)\ncpu (null)\n") == 8
    assert gpus_from_sinfo("a100* gpu:4,gpu:a100:4\n") == 4
    assert gpus_from_sinfo("") == 0  # no sinfo is run here: tests/cluster reads the testbed's
