"""The Ray backend on a real local Ray cluster: a head and two worker nodes, one CPU each.

One cluster serves the whole test session (every Ray Train run costs about 50 s
on 2 cores); it is stopped when the session ends. STRICT_SPREAD in the test
profile makes Ray place the two training workers on different nodes.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from helpers import RECIPES, REPO, assert_same_weights, final_weights, launch, metric_lines, small_run, summary

OBJECT_STORE = 80 * 2**20
RAY_TIMEOUT = 600  # generous for a shared machine; a healthy run takes about a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_env():
    """Token authentication on, with our own token and temp dir, so the session touches neither ~/.ray/auth_token
    nor /tmp/ray (which other Ray users of this machine share); the path is short because Unix socket paths are
    limited to 107 bytes."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=temp_dir)
    yield
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_env):
    """A 2-node Ray cluster (plus a CPU-less head with the dashboard for Ray Jobs)."""
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
    common = {"object_store_memory": OBJECT_STORE}
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard_port, **common},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, **common)
        cluster.wait_for_nodes()
        yield cluster, f"http://127.0.0.1:{dashboard_port}"
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def ray_profile(ray_cluster, tmp_path_factory):
    cluster, dashboard = ray_cluster
    path = tmp_path_factory.mktemp("ray-profile") / "ray.yaml"
    path.write_text(
        f"backend: ray\naddress: {cluster.address}\ndashboard: {dashboard}\n"
        "cpu_workers_per_node: 1\ncpus_per_worker: 1\nplacement_strategy: STRICT_SPREAD\n"
        "max_failures: 1\n"
    )
    return path


def ray_run(model: str, out, profile, *extra: str, env: dict | None = None, cwd: Path = REPO, eval_command=False):
    command = ["eval"] if eval_command else []
    return launch(
        *command, *small_run(model, out), *extra, "--nodes", "2", "--cluster", profile, env=env, timeout=RAY_TIMEOUT,
        cwd=cwd,
    )  # fmt: skip


# The clean run's environment holds a secret (which Ray must never receive in a runtime_env) and a plain setting
# that does travel in the workers' runtime_env: Ray's state shows the second, so a search for the first means
# something.
SECRET_TOKEN = f"hf_{secrets.token_hex(16)}"
PLAIN_PROBE = f"probe-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def clean_run(tiny, ray_profile, tmp_path_factory):
    """An uninterrupted 2-worker run: dropout on, so the resumed run must restore every rank's RNG too. Its
    output_dir is relative (`run`, from the folder `launch` runs in), as users write it: the workers, whose
    working directory is Ray's session folder, must still write there."""
    out = tmp_path_factory.mktemp("ray-clean") / "run"
    # Ray Train keeps its run state (shown by the dashboard's Train API) when this is on: searched below too
    env = {"HF_TOKEN": SECRET_TOKEN, "LAUNCHER_STATE_PROBE": PLAIN_PROBE, "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
    return out, ray_run(tiny["bert_dropout"], out, ray_profile, "output_dir=run", env=env, cwd=out.parent)


def ray_state(dashboard: str) -> dict[str, str]:
    """What Ray's State API and dashboard hold about jobs, actors, tasks, runtime envs, events and Ray Train runs
    (the raw JSON answers), read with this session's token as an API client would."""
    import urllib.request

    answers = {}
    for endpoint in (
        "/api/v0/tasks?detail=1&limit=10000",
        "/api/v0/actors?detail=1&limit=10000",
        "/api/v0/jobs?limit=10000",
        "/api/jobs/",
        "/api/v0/runtime_envs?limit=10000",
        "/api/v0/cluster_events?limit=10000",
        "/api/v0/workers?detail=1&limit=10000",
        "/api/v0/objects?limit=10000",
        "/api/train/v2/runs/v1",
    ):
        request = urllib.request.Request(
            dashboard + endpoint, headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            answers[endpoint] = answer.read().decode()
    return answers


def test_a_secret_reaches_the_workers_but_never_rays_state(clean_run, ray_cluster):
    """HF_TOKEN travels from the driver to the workers through the object store (backends/ray/trainer.py): the
    workers have it, and no answer of Ray's State API or dashboard (jobs, actors, tasks with their runtime_env,
    runtime envs, events, Ray Train runs) contains it, while the runtime_env's plain settings are there."""
    out, run = clean_run
    assert run.returncode == 0, run.output[-4000:]
    assert "HF_TOKEN" in summary(out)["ray"]["secrets_received"]
    state = ray_state(ray_cluster[1])
    assert any(PLAIN_PROBE in text for text in state.values()), "the state searched holds the workers' runtime_env"
    leaked = [endpoint for endpoint, text in state.items() if SECRET_TOKEN in text]
    assert leaked == [], f"Ray recorded the token in {leaked}"


def test_two_workers_on_two_ray_nodes(clean_run):
    out, run = clean_run
    assert run.returncode == 0, run.output[-4000:]
    s = summary(out)
    assert s["world_size"] == 2 and s["backend"] == "gloo" and s["distributed_type"] == "MULTI_CPU"
    nodes = s["ray"]["node_id_per_rank"]
    assert len(nodes) == 2 and nodes[0] != nodes[1], "STRICT_SPREAD: each worker on its own Ray node"
    assert s["ray"]["torch_threads"] == 1, "OMP_NUM_THREADS = cpus_per_worker"
    assert s["steps"] == 12 and s["resumed_from"] is None and not s["ray"]["resumed_from_ray_storage"]
    assert s["param_checksum_per_rank"][0] == s["param_checksum_per_rank"][1]
    assert s["train_loss"]["last"] < s["train_loss"]["first"]
    # a prepare task on each of the two Ray nodes saw to the tokenized cache before the workers started
    assert len(set(re.findall(r"\(Ray node (\w+)\): data", run.output))) == 2, run.output[-3000:]
    # every complete checkpoint was reported to Ray and copied into its storage
    ray_dir = next((out / "ray").iterdir())
    assert sorted(p.name for p in ray_dir.glob("checkpoint-*")) == ["checkpoint-00000008", "checkpoint-00000012"]
    # the relative output_dir: everything in it, and the closing line names it
    for name in ("summary.json", "metrics.jsonl", "final/model.safetensors", "checkpoint-00000012"):
        assert (out / name).exists(), name
    assert f"summary: {out.resolve() / 'summary.json'}" in run.stdout
    assert "\x1b[" not in run.output, "no raw ANSI colour codes in a log"


def test_killed_worker_is_restarted_and_resumes_exactly(clean_run, tiny, ray_profile, tmp_path):
    """Rank 1 is SIGKILLed once, at step 6: within the same launch Ray restarts the worker group, which
    resumes from the newest complete checkpoint (step 4) and ends with the weights of the uninterrupted run."""
    clean_out, clean = clean_run
    assert clean.returncode == 0, clean.output[-4000:]
    out, marker = tmp_path / "run", tmp_path / "fault-fired"
    run = ray_run(
        tiny["bert_dropout"], out, ray_profile, env={"LAUNCHER_FAULT": f"rank=1,step=6,phase=step,once={marker}"}
    )
    assert run.returncode == 0, run.output[-4000:]
    assert marker.exists(), "the worker was killed"
    s = summary(out)
    assert s["resumed_from"].endswith("checkpoint-00000004"), run.output[-6000:]
    assert s["steps"] == 12 and s["steps_this_launch"] == 8
    assert [r["step"] for r in metric_lines(out) if "split" not in r] == list(range(1, 13))
    assert_same_weights(final_weights(clean_out), final_weights(out), atol=1e-6)
    assert s["train_loss"] == pytest.approx(summary(clean_out)["train_loss"], abs=1e-6)


def test_zero2_in_ray_workers_shards_and_matches_ddp(clean_run, tiny, ray_profile, tmp_path):
    """DeepSpeed ZeRO-2 inside Ray Train workers: the same engine as the local backend, optimizer states split
    between the two nodes' workers, and the same weights as the DDP run of the same recipe."""
    clean_out, clean = clean_run
    assert clean.returncode == 0, clean.output[-4000:]
    out = tmp_path / "run"
    run = ray_run(tiny["bert_dropout"], out, ray_profile, "distributed.strategy=zero2")
    assert run.returncode == 0, run.output[-4000:]
    s = summary(out)
    assert s["world_size"] == 2 and s["strategy"] == "zero2" and s["sharded"] == "optimizer states"
    nodes = s["ray"]["node_id_per_rank"]
    assert nodes[0] != nodes[1]
    (local0, whole0), (local1, whole1) = s["held_per_rank"]
    assert whole0 == whole1 and 0.45 * whole0 <= local0 <= 0.55 * whole0 and 0.45 * whole1 <= local1 <= 0.55 * whole1
    assert_same_weights(final_weights(clean_out), final_weights(out), atol=1e-4)


def test_failing_run_exits_nonzero_with_the_cause(ray_env, tiny, tmp_path):
    """A failing worker ends the launch with exit 1 naming the rank and its error (restarts are shown by the
    test above). This run uses the shipped cluster/ray-local.yaml (`address: local`: a private one-node Ray
    started and stopped by the launch, max_failures 0)."""
    run = launch(
        *small_run(tiny["bert"], tmp_path / "run"),
        "--cluster",
        REPO / "cluster" / "ray-local.yaml",
        timeout=RAY_TIMEOUT,
        env={"LAUNCHER_FAULT": "rank=1,step=2,phase=step,kind=raise"},
    )
    assert run.returncode == 1, run.output[-4000:]
    verdict = run.stderr.split("error: training failed")[-1]
    assert "rank 1" in verdict and "injected failure at step 2" in verdict, run.stderr[-4000:]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_submit_as_ray_job_and_follow(tiny, ray_profile, tmp_path):
    out = tmp_path / "run"
    run = launch(
        *small_run(tiny["bert"], out),
        "--nodes",
        "2",
        "--cluster",
        ray_profile,
        "--submit",
        "--follow",
        timeout=RAY_TIMEOUT,
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "submitted Ray job raysubmit_" in run.stdout and "SUCCEEDED" in run.stdout
    assert f"summary: {out.resolve() / 'summary.json'}" in run.stdout, "the job's own log was streamed"
    s = summary(out)
    assert s["world_size"] == 2 and s["steps"] == 12
    # the job handle of the backend contract: `launch status RUN_DIR` asks Ray Jobs about the submission
    status = launch("status", out)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "step 12 of 12" in status.stdout, status.output


def test_cancel_a_submitted_ray_job(tiny, ray_profile, tmp_path):
    out = tmp_path / "run"
    run = launch(*small_run(tiny["bert"], out, "train.max_steps=100000"), "--nodes", "2", "--cluster", ray_profile,
                 "--submit", timeout=RAY_TIMEOUT)  # fmt: skip
    assert run.returncode == 0, run.output[-4000:]
    job_id = re.search(r"submitted Ray job (raysubmit_\w+)", run.stdout).group(1)
    cancel = launch("cancel", out)
    assert cancel.returncode == 0 and f"ray job stop {job_id}: done" in cancel.stdout, cancel.output
    deadline = time.time() + 60
    while "STOPPED" not in (status := launch("status", job_id, "--cluster", ray_profile)).stdout:
        assert time.time() < deadline, status.output
        time.sleep(1)


def test_ray_profile_dry_run_and_errors(tmp_path):
    """No cluster needed: the shipped profile plans 4 × 8 GPU workers; bad profiles exit 2 naming the field."""
    ok = launch(
        RECIPES / "quickstart.yaml",
        "train.batch_size=64",
        f"output_dir={tmp_path / 'run'}",
        "--nodes",
        "4",
        "--cluster",
        REPO / "cluster" / "ray.yaml",
        "--dry-run",
    )
    assert ok.returncode == 0, ok.output
    assert "4 × 8" in ok.stdout and "cuda / nccl" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "backend: ray\naddress: local\nplacement_strategy: STRICT_SPREAD\ncpu_workers_per_node: 2\nmax_failure: 3\n"
    )
    run = launch(RECIPES / "quickstart.yaml", "--nodes", "2", "--cluster", bad, "--dry-run")
    assert run.returncode == 2 and "max_failure" in run.stderr and "max_failures" in run.stderr, run.stderr
    bad.write_text("backend: ray\naddress: local\nplacement_strategy: STRICT_SPREAD\ncpu_workers_per_node: 2\n")
    run = launch(RECIPES / "quickstart.yaml", "--nodes", "2", "--cluster", bad, "--dry-run")
    assert run.returncode == 2 and "--nodes" in run.stderr and "STRICT_SPREAD" in run.stderr, run.stderr
    run = launch(RECIPES / "quickstart.yaml", "--follow", "--cluster", bad, "--dry-run")
    assert run.returncode == 2 and "add --submit" in run.stderr, run.stderr


def test_resume_prefers_the_newer_of_output_dir_and_ray_storage(tmp_path):
    """Ray registers a reported checkpoint only when it next polls the workers: output_dir may be ahead."""
    from launcher.backends.ray import newer_than_output_dir
    from launcher.config.loading import load_recipe

    def checkpoint(folder, step):
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(f'{{"step": {step}}}')
        return folder

    out = tmp_path / "run"
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"output_dir={out}"])
    in_ray = checkpoint(tmp_path / "ray" / "checkpoint-00000008", 8)
    assert newer_than_output_dir(in_ray, recipe), "nothing in output_dir"
    checkpoint(out / "checkpoint-00000008", 8)
    assert not newer_than_output_dir(in_ray, recipe), "a tie: output_dir's, no copy needed"
    assert newer_than_output_dir(checkpoint(tmp_path / "ray" / "checkpoint-00000012", 12), recipe)


def test_ray_up_example_follows_rays_cluster_schema():
    import json

    import jsonschema
    import ray.autoscaler
    import yaml

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "ray-up.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu-worker"]["max_workers"] == config["max_workers"] == 4


@pytest.mark.slow  # the eval path is the training path with train.max_steps=0 (tests/integration/test_best_and_eval.py)
def test_eval_through_ray_workers_gives_the_runs_metrics(clean_run, tiny, ray_profile):
    """`launch eval --model final/` on the 2-node Ray cluster: the metrics the training run reported."""
    out, clean = clean_run
    assert clean.returncode == 0, clean.output[-4000:]
    run = ray_run(tiny["bert_dropout"], out, ray_profile, "--model", str(out / "final"), eval_command=True)
    assert run.returncode == 0, run.output[-4000:]
    got, want = summary(out / "eval" / "final"), summary(out)
    assert got["steps"] == 0 and got["world_size"] == 2 and got["final_model"] is None
    for split in want["metrics"]:
        numbers = {k: v for k, v in want["metrics"][split].items() if isinstance(v, float)}
        assert {k: got["metrics"][split][k] for k in numbers} == pytest.approx(numbers, rel=1e-5), split
