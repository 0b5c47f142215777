"""Tracker runs across a kill and a resume (train.trackers), with TensorBoard's event files: the resumed
launch continues the same run and sends none of the steps the killed launch had sent."""

from __future__ import annotations

import logging

from launcher.train.trackers import RunInfo, Trackers, flatten, read_ledger


def scalars(folder, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_resumed_launch_continues_the_run_without_duplicating_steps(tmp_path):
    info = RunInfo(name="run", project="p", params={"recipe": {"train": {"batch_size": 8}}}, tags={"git_commit": "x"})
    log = logging.getLogger("test")
    killed = Trackers(["tensorboard"], tmp_path, None, False, info, log)
    for step in range(1, 7):
        killed.log("train", step, {"train/loss": 1.0 / step})
    killed.log("validation", 3, {"validation/loss": 0.5})
    ids = killed.ids()  # what the checkpoint of step 4 stored; the launch dies at step 6 without closing
    resumed = Trackers(["tensorboard"], tmp_path, ids, False, info, log)
    assert resumed.ids() == ids
    for step in range(5, 11):  # steps 5 and 6 are trained again after the checkpoint of step 4
        resumed.log("train", step, {"train/loss": 1.0 / step})
    resumed.log("validation", 6, {"validation/loss": 0.4})
    resumed.close(finished=True)
    assert scalars(tmp_path / "tensorboard", "train/loss") == list(range(1, 11))
    assert scalars(tmp_path / "tensorboard", "validation/loss") == [3, 6]
    assert read_ledger(tmp_path / "trackers.json")["sent"]["tensorboard"] == {"train": 10, "validation": 6}


def test_train_resume_never_starts_new_runs(tmp_path):
    info = RunInfo(name="run", project="p", params={})
    log = logging.getLogger("test")
    first = Trackers(["tensorboard"], tmp_path, None, False, info, log)
    first.log("train", 5, {"train/loss": 1.0})
    first.close(finished=True)
    again = Trackers(["tensorboard"], tmp_path, None, True, info, log)
    assert again.sent["tensorboard"] == {}, "resume: never forgets what the earlier run sent"


def test_parameters_are_the_flattened_recipe_and_plan():
    flat = flatten(
        {"recipe": {"train": {"optimizer": {"lr": 1e-3}, "report_to": ["mlflow"]}}, "plan": {"world_size": 2}}
    )
    assert flat == {"recipe.train.optimizer.lr": 1e-3, "recipe.train.report_to": '["mlflow"]', "plan.world_size": 2}


def test_tracker_settings_reach_ray_workers_and_their_credentials_only_as_secrets(monkeypatch):
    """A Ray runtime_env is recorded by Ray (State API, dashboard): MLFLOW_*/WANDB_* settings travel in it, a
    tracker credential never does; it goes with the secrets through the object store (backends/ray/trainer.py)."""
    from launcher.backends.ray.trainer import ray_worker_env, secrets
    from launcher.config.cluster import RayProfile
    from launcher.config.recipe import Recipe
    from launcher.planning.plan import make_plan

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key")
    profile = RayProfile(backend="ray")
    recipe = Recipe.model_validate({"model": {"path": "unused"}, "task": {"type": "causal_lm"},
                                    "data": {"train": "unused.jsonl"}, "output_dir": "out"})  # fmt: skip
    env = ray_worker_env(make_plan(recipe, num_train_samples=64, procs_per_node=1), profile)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert "MLFLOW_TRACKING_PASSWORD" not in env and "WANDB_API_KEY" not in env
    assert {"MLFLOW_TRACKING_PASSWORD": "hunter2", "WANDB_API_KEY": "wandb-key"}.items() <= secrets(profile).items()
