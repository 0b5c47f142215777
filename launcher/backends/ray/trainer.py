"""The driver side of a Ray run: connect to the cluster, run TorchTrainer, and the function every Ray Train
worker runs (train.run, reporting each checkpoint to Ray so a restarted worker group resumes from it)."""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import nullcontext
from pathlib import Path

from launcher.backends.torchrun import worker_env
from launcher.config.cluster import ALWAYS_SECRET, RayProfile
from launcher.config.loading import dump_recipe
from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan
from launcher.spec import LaunchFacts

# Set by Ray Jobs for the entrypoint: the driver is already on the cluster, with the job's runtime_env.
IN_RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Travel from the driver to the workers: the launcher's own settings (cache, failure drills) and Hugging Face's.
FORWARDED_PREFIXES = ("LAUNCHER_", "HF_")
# The trackers' settings (train.report_to: MLFLOW_TRACKING_URI, WANDB_MODE, ...) travel too; their credentials
# (CREDENTIAL in the name) never in a runtime_env, which Ray records: they travel as secrets (the object store).
TRACKER_PREFIXES = ("MLFLOW_", "WANDB_")
CREDENTIAL = re.compile(r"TOKEN|PASSWORD|SECRET|KEY")


def run_name(recipe: Recipe) -> str:
    """One Ray run per output_dir, so relaunching the same command finds the same Ray checkpoints."""
    path = str(Path(recipe.output_dir).resolve())
    if recipe.train.resume == "never":  # start over: no Ray checkpoint of an earlier launch may be restored
        path += f"@{os.getpid()}-{os.times().elapsed}"
    return f"{Path(recipe.output_dir).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def ray_worker_env(plan: Plan, profile: RayProfile) -> dict[str, str]:
    """Environment of every worker, without a secret (see `secrets`); the profile's runtime_env.env_vars win.
    It becomes the workers' runtime_env, which Ray records in its state (State API, dashboard, export events)."""
    env = worker_env(plan)
    # Ray would guess from the reservation; say it, since a missing OMP_NUM_THREADS costs up to 40x on CPU.
    env["OMP_NUM_THREADS"] = str(profile.cpus_per_worker)
    secret = set(secret_names(profile))
    env.update({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and k not in secret})
    env.update({k: v for k, v in os.environ.items() if k.startswith(TRACKER_PREFIXES) and k not in secret})
    env.update(profile.runtime_env.get("env_vars", {}))
    return env


def secret_names(profile: RayProfile) -> list[str]:
    """The profile's secrets, and the trackers' credentials this environment holds (MLFLOW_TRACKING_PASSWORD...)."""
    trackers = [k for k in os.environ if k.startswith(TRACKER_PREFIXES) and CREDENTIAL.search(k)]
    return [*ALWAYS_SECRET, *profile.secret_env, *trackers]


def secrets(profile: RayProfile) -> dict[str, str]:
    """The secrets of this environment the workers need (HF_TOKEN, ...). They never go into a runtime_env: the
    driver puts them into the object store (ray.put), the workers read them with ray.get and set them in their
    own process. Ray records object ids, sizes and call sites, never an object's content."""
    return {name: os.environ[name] for name in secret_names(profile) if name in os.environ}


# Ray Train's PreemptionWatcher actor (2.60) logs an error line at every start ("constructor arguments in the
# object store and max_restarts > 0") and a traceback when its drain poll fails; the launcher does not use
# what it watches for (node drain notices: a stop is a checkpoint and a restart here), so it is not started.
QUIET_RAY = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def job_runtime_env(profile: RayProfile) -> dict:
    """The profile's runtime_env for the Ray job, with QUIET_RAY (the profile's own env_vars win)."""
    env = dict(profile.runtime_env)
    env["env_vars"] = {**QUIET_RAY, **env.get("env_vars", {})}
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
            runtime_env=job_runtime_env(profile),
        )
    else:
        ray.init(address=profile.address, runtime_env=job_runtime_env(profile))


def fit(recipe: Recipe, plan: Plan, profile: RayProfile, facts: LaunchFacts) -> None:
    """Connect and train every rank as a Ray Train worker; Ray's own exceptions propagate."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = profile.storage_path or str((Path(recipe.output_dir) / "ray").resolve())
    resources = {"CPU": profile.cpus_per_worker, **({"GPU": 1} if profile.gpus_per_node else {})}
    import ray

    connect(profile, plan)
    prepare_on_nodes(recipe, plan, profile)  # before TorchTrainer makes the process group
    if recipe.data.prepare == "only":
        return
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "recipe": dump_recipe(recipe),
            "plan": plan.model_dump_json(),
            "facts": facts.model_dump_json(),
            "secrets": [ray.put(secrets(profile))],  # a reference, resolved by each worker (in a list: not by Ray)
        },
        # Ray Train makes the process group; give it the recipe's collective timeout (Ray's default: 30 min)
        torch_config=TorchConfig(backend=plan.backend, timeout_s=int(recipe.distributed.collective_timeout)),
        scaling_config=ScalingConfig(
            num_workers=plan.world_size,
            use_gpu=bool(profile.gpus_per_node),
            resources_per_worker=resources,
            placement_strategy=profile.placement_strategy,
        ),
        run_config=RunConfig(
            name=facts.scheduler.get("ray_run_name") or run_name(recipe),
            storage_path=storage,
            failure_config=FailureConfig(max_failures=profile.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.train.keep_last),
            worker_runtime_env={"env_vars": ray_worker_env(plan, profile)},
        ),
    )
    trainer.fit()


def prepare_on_nodes(recipe: Recipe, plan: Plan, profile: RayProfile) -> None:
    """The tokenized cache written before any worker starts: here for a private one-node Ray, else one Ray task
    on every node with a CPU (on a cache folder the nodes share, one writes each entry, the others wait on its
    lock file). A task's data error is raised here as it is (exit 2)."""
    import ray

    from launcher.commands.prepare import before_ranks

    if profile.address == "local":
        print(before_ranks(recipe, plan), flush=True)
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    task = ray.remote(num_cpus=1, max_retries=0)(prepare_task)
    env = {"env_vars": ray_worker_env(plan, profile)}
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), runtime_env=env).remote(
            dump_recipe(recipe), plan.model_dump_json()
        )
        for node in nodes
    ]
    try:
        for lines in ray.get(refs):
            print(lines, flush=True)
    except ray.exceptions.RayTaskError as exc:
        from launcher.errors import UserError

        if isinstance(exc.cause, UserError):
            raise exc.cause from None
        raise


def prepare_task(recipe_text: str, plan_json: str) -> str:
    """One node's share of prepare_on_nodes (a Ray task)."""
    import socket

    import ray
    import yaml

    from launcher.commands.prepare import before_ranks

    recipe, plan = Recipe.model_validate(yaml.safe_load(recipe_text)), Plan.model_validate_json(plan_json)
    node = ray.get_runtime_context().get_node_id()[:8]
    return before_ranks(recipe, plan, f"node {socket.gethostname()} (Ray node {node}): ")


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

    from launcher.train.run import run

    received = ray.get(config["secrets"][0])
    os.environ.update(received)  # this worker's own process: what the libraries read (HF_TOKEN, ...)
    recipe = Recipe.model_validate(yaml.safe_load(config["recipe"]))
    plan = Plan.model_validate_json(config["plan"])
    facts = LaunchFacts.model_validate_json(config["facts"])
    rank = ray.train.get_context().get_world_rank()
    nodes = [None] * plan.world_size
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    def report(folder: Path, state) -> None:
        # checkpoint.save waits for every rank and renames the folder on the shared output_dir, so rank 0's
        # folder holds every rank's files (model, optimizer, each rank's RNG state, and shards).
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
        ray.train.report(
            {"step": state.step, "loss": state.last_loss},
            checkpoint=checkpoint,
            checkpoint_dir_name=folder.name,
            delete_local_checkpoint_after_upload=False,
        )

    restored = ray.train.get_checkpoint()  # after a restart: the newest checkpoint Ray has registered
    with restored.as_directory() if restored else nullcontext() as folder:
        from_ray = folder is not None and newer_than_output_dir(Path(folder), recipe)
        if from_ray:
            recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"resume": folder})})
        summary = run(recipe, plan, facts, on_checkpoint=report)
    if rank == 0 and summary is not None:
        summary.ray = {
            "node_id_per_rank": nodes,
            "resumed_from_ray_storage": from_ray,
            "torch_threads": torch.get_num_threads(),
            "secrets_received": sorted(received),  # names only
        }
        summary.write(Path(recipe.output_dir) / "summary.json")


def newer_than_output_dir(restored: Path, recipe: Recipe) -> bool:
    """Ray registers a reported checkpoint when it next polls the workers (every 2 s), so a worker that dies
    right after a save can leave output_dir one checkpoint ahead of Ray; resume from whichever is newer (of
    output_dir's, the newest intact one)."""
    from launcher.train.checkpoint import CheckpointDamaged, newest_intact, read_state

    try:
        local, _ = newest_intact(Path(recipe.output_dir), recipe.train.resume)
    except CheckpointDamaged:  # every checkpoint in output_dir is damaged: Ray's copy is the one to resume
        local = None
    return local is None or read_state(local).step < read_state(restored).step
