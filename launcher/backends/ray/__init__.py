"""Ray backend: the same train.run inside Ray Train's TorchTrainer workers, with Ray's fault tolerance.

Every complete checkpoint is reported to Ray (train.run's on_checkpoint hook),
so when a worker or a node dies Ray restarts the whole worker group
(FailureConfig.max_failures) and each new worker resumes from the newest
reported checkpoint: model, optimizer, scheduler and RNG state, and the step,
from which the stateless sampler recomputes the exact next batch. A run that
still fails makes `launch` exit 1 naming the failed ranks and their cause.

`--submit` hands the same `launch` command to Ray Jobs instead, so it runs as
the driver on the cluster's head node.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

from launcher.backends.local import LaunchStopped, Layout, result_file, worker_env
from launcher.config.cluster import RayProfile
from launcher.config.loading import Problem, RecipeError
from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan

# Set by Ray Jobs for the entrypoint: the driver is already on the cluster, with the job's runtime_env.
IN_RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Travel from the driver to the workers: the launcher's own settings (cache, failure drills) and Hugging Face's.
FORWARDED_PREFIXES = ("LAUNCHER_", "HF_")


def layout(profile: RayProfile, *, nodes: int, procs: int | None) -> Layout:
    problems = []
    if profile.address == "local" and nodes != 1:
        problems.append(
            Problem(
                "--nodes",
                f"{nodes} nodes, but the profile's address is 'local' (a private "
                "one-node Ray); give the address of a running cluster",
            )
        )
    if profile.gpus_per_node and procs is not None:
        problems.append(
            Problem(
                "--procs", "a GPU Ray profile runs one worker per GPU (gpus_per_node); --procs only sets CPU workers"
            )
        )
    per_node = profile.gpus_per_node or procs or profile.cpu_workers_per_node
    if profile.placement_strategy == "STRICT_SPREAD" and per_node > 1:
        problems.append(
            Problem(
                "placement_strategy",
                f"STRICT_SPREAD puts each worker on its own node, but "
                f"{per_node} workers per node were asked for; use PACK or SPREAD",
            )
        )
    if problems:
        raise RecipeError("cluster profile", problems)
    return Layout(nodes, per_node, "cuda" if profile.gpus_per_node else "cpu")


def run_name(recipe: Recipe) -> str:
    """One Ray run per output_dir, so relaunching the same command finds the same Ray checkpoints."""
    path = str(Path(recipe.output_dir).resolve())
    if recipe.train.resume == "never":  # start over: no Ray checkpoint of an earlier launch may be restored
        path += f"@{os.getpid()}-{os.times().elapsed}"
    return f"{Path(recipe.output_dir).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def ray_worker_env(plan: Plan, profile: RayProfile, t0: float) -> dict[str, str]:
    """Environment of every worker; the profile's runtime_env.env_vars win."""
    env = worker_env(plan, t0)
    # Ray would guess from the reservation; say it, since a missing OMP_NUM_THREADS costs up to 40x on CPU.
    env["OMP_NUM_THREADS"] = str(profile.cpus_per_worker)
    env.update({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)})
    env.update(profile.runtime_env.get("env_vars", {}))
    return env


def connect(profile: RayProfile, plan: Plan) -> None:
    import ray

    from launcher.config.cluster import parse_bytes

    if IN_RAY_JOB in os.environ:
        ray.init()
    elif profile.address == "local":
        # A new instance even if one runs here. The dashboard also serves the State API, which Ray Train's
        # placement group cleaner polls every second.
        ray.init(
            address="local",
            num_cpus=plan.world_size * profile.cpus_per_worker,
            num_gpus=plan.world_size if profile.gpus_per_node else 0,
            object_store_memory=parse_bytes(profile.object_store_memory),
            runtime_env=profile.runtime_env or None,
        )
    else:
        ray.init(address=profile.address, runtime_env=profile.runtime_env or None)


def launch(recipe: Recipe, plan: Plan, profile: RayProfile, t0: float, *, follow: bool = True) -> int:
    """Run every rank as a Ray Train worker; the exit status of `launch` (see launcher.cli)."""
    from launcher.config.loading import dump_recipe
    from launcher.train.worker import write_spec

    write_spec(Path(recipe.output_dir), recipe, plan)
    os.environ["RAY_AUTH_MODE"] = profile.auth  # read when ray is imported and initialised
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def stop(signum, _frame):
        raise LaunchStopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    storage = profile.storage_path or str((Path(recipe.output_dir) / "ray").resolve())
    resources = {"CPU": profile.cpus_per_worker, **({"GPU": 1} if profile.gpus_per_node else {})}
    try:
        connect(profile, plan)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"recipe": dump_recipe(recipe), "plan": plan.model_dump_json()},
            # Ray Train makes the process group; give it the recipe's collective timeout (Ray's default: 30 min)
            torch_config=TorchConfig(backend=plan.backend, timeout_s=int(recipe.distributed.collective_timeout)),
            scaling_config=ScalingConfig(
                num_workers=plan.world_size,
                use_gpu=bool(profile.gpus_per_node),
                resources_per_worker=resources,
                placement_strategy=profile.placement_strategy,
            ),
            run_config=RunConfig(
                name=run_name(recipe),
                storage_path=storage,
                failure_config=FailureConfig(max_failures=profile.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=recipe.train.keep_last),
                worker_runtime_env={"env_vars": ray_worker_env(plan, profile, t0)},
            ),
        )
        trainer.fit()
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:  # from connect
        print(
            f"error: cannot join the Ray cluster at {profile.address!r} (auth: {profile.auth}): {exc}\n"
            "Is it up (ray status --address ADDRESS)?",
            file=sys.stderr,
        )
        return 1
    except ray.train.TrainingFailedError as exc:
        print(
            f"error: training failed on Ray (worker group restarts allowed: max_failures {profile.max_failures}):"
            f"\n{describe_failure(exc)}",
            file=sys.stderr,
        )
        return 1
    except (LaunchStopped, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, LaunchStopped) else signal.SIGINT
        print(f"error: {LaunchStopped(signum)}", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()
    print(f"done: {Path(recipe.output_dir).resolve() / result_file(recipe)}")
    return 0


def describe_failure(exc) -> str:
    """One line per failed rank with the last line of its error (Ray's own message holds the tracebacks)."""
    from ray.train import WorkerGroupError

    if not isinstance(exc, WorkerGroupError):
        return str(exc)
    lines = []
    for rank, error in sorted(exc.worker_failures.items()):
        text = [line.strip() for line in str(error).splitlines() if line.strip()]
        lines.append(f"rank {rank}: {type(error).__name__}: {text[-1] if text else ''}")
    return "\n".join(lines)


def train_worker(config: dict) -> None:
    """One Ray Train worker (Ray has set up torch.distributed): train.run, reporting checkpoints to Ray."""
    import ray
    import ray.train
    import torch
    import yaml

    from launcher.train.checkpoint import write_json_atomic
    from launcher.train.run import run

    recipe = Recipe.model_validate(yaml.safe_load(config["recipe"]))
    plan = Plan.model_validate_json(config["plan"])
    rank = ray.train.get_context().get_world_rank()
    nodes = [None] * plan.world_size
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    def report(folder: Path, state: dict) -> None:
        # checkpoint.save waits for every rank and renames the folder on the shared output_dir, so rank 0's
        # folder holds every rank's files (model, optimizer, each rank's RNG state, and shards).
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
        ray.train.report(
            {"step": state["step"], "loss": state["last_loss"]},
            checkpoint=checkpoint,
            checkpoint_dir_name=folder.name,
            delete_local_checkpoint_after_upload=False,
        )

    restored = ray.train.get_checkpoint()  # after a restart: the newest checkpoint Ray has registered
    with restored.as_directory() if restored else nullcontext() as folder:
        from_ray = folder is not None and newer_than_output_dir(Path(folder), recipe)
        if from_ray:
            recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"resume": folder})})
        summary = run(recipe, plan, on_checkpoint=report)
    if rank == 0 and recipe.preflight.run != "only":
        summary["ray"] = {
            "node_id_per_rank": nodes,
            "resumed_from_ray_storage": from_ray,
            "torch_threads": torch.get_num_threads(),
        }
        write_json_atomic(Path(recipe.output_dir) / "summary.json", summary)


def newer_than_output_dir(restored: Path, recipe: Recipe) -> bool:
    """Ray registers a reported checkpoint when it next polls the workers (every 2 s), so a worker that dies
    right after a save can leave output_dir one checkpoint ahead of Ray; resume from whichever is newer (of
    output_dir's, the newest intact one)."""
    from launcher.train.checkpoint import CheckpointDamaged, newest_intact, read_state

    try:
        local, _ = newest_intact(Path(recipe.output_dir), recipe.train.resume)
    except CheckpointDamaged:  # every checkpoint in output_dir is damaged: Ray's copy is the one to resume
        local = None
    return local is None or read_state(local)["step"] < read_state(restored)["step"]


def submit_job(args, profile: RayProfile) -> int:
    """`launch ... --submit`: the same command as a Ray job; prints its id; --follow streams its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    if profile.dashboard is None:
        raise RecipeError(
            "cluster profile", [Problem("dashboard", "--submit goes through Ray Jobs; set dashboard: http://HEAD:8265")]
        )
    os.environ["RAY_AUTH_MODE"] = profile.auth
    command = [
        "-m",
        "launcher.cli",
        str(args.recipe),
        *args.overrides,
        "--nodes",
        str(args.nodes),
        "--cluster",
        str(args.cluster),
    ]
    if args.procs is not None:
        command += ["--procs", str(args.procs)]
    if "working_dir" in profile.runtime_env:  # uploaded by Ray; paths are relative to it
        entrypoint = shlex.join(["python", *command])
    else:  # the head sees this folder and this Python (a shared filesystem)
        entrypoint = f"cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *command])}"
    client = JobSubmissionClient(profile.dashboard)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=profile.runtime_env or None)
    print(f"submitted Ray job {job_id}; its logs: ray job logs --follow {job_id} --address {profile.dashboard}")
    if not args.follow:
        return 0
    import asyncio

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job keeps running (ray job stop {job_id} --address {profile.dashboard})",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    status = client.get_job_status(job_id)
    print(f"Ray job {job_id}: {status.value}", file=sys.stderr if status != JobStatus.SUCCEEDED else sys.stdout)
    return 0 if status == JobStatus.SUCCEEDED else 1
