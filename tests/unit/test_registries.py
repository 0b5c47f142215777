"""Every registry is a table that covers exactly what the schema allows (one home per concept).

A new task type, loss, metric, strategy or backend is an entry in its table; these tests fail until the
entry, its schema value and its implementation all exist (docs/extending.md says which files).
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest

from launcher.backends import BACKENDS
from launcher.backends.base import Backend
from launcher.config.cluster import PROFILES
from launcher.config.losses import LOSS_CONFIGS, LossConfig
from launcher.config.recipe import DistributedConfig, TaskConfig
from launcher.config.tasks import TASKS
from launcher.config.training import Tracker
from launcher.planning.compat import IMPLEMENTED
from launcher.train.engines import ENGINES
from launcher.train.engines.base import Engine
from launcher.train.losses import LOSSES
from launcher.train.metrics import METRICS
from launcher.train.tasks import TaskHooks, hooks_class
from launcher.train.trackers import TRACKERS

LAUNCHER = Path(__file__).resolve().parents[2] / "launcher"


def literal_values(annotation) -> set:
    return set(typing.get_args(annotation))


def test_task_registry_is_the_schema_and_every_entry_has_rank_hooks():
    assert set(TASKS) == literal_values(TaskConfig.model_fields["type"].annotation)
    for name, spec in TASKS.items():
        assert spec.name == name
        assert issubclass(hooks_class(spec.rank_hooks), TaskHooks), name
        assert spec.losses and set(spec.losses) <= set(LOSS_CONFIGS), name
        assert set(spec.default_metrics) <= set(spec.metrics) <= set(METRICS), name


def test_loss_registry_covers_the_loss_union_exactly():
    union = set(typing.get_args(typing.get_args(LossConfig)[0]))
    assert set(LOSSES) == union == set(LOSS_CONFIGS.values())
    assert {name for spec in TASKS.values() for name in spec.losses} == set(LOSS_CONFIGS)


def test_metric_registry_covers_every_metric_a_task_allows():
    assert {name for spec in TASKS.values() for name in spec.metrics} == set(METRICS)


def test_tracker_registry_covers_every_report_to_name():
    assert set(TRACKERS) == literal_values(Tracker)
    assert all(tracker.name == name for name, tracker in TRACKERS.items())


def test_engine_registry_covers_every_strategy_the_planner_can_plan():
    strategies = literal_values(DistributedConfig.model_fields["strategy"].annotation) - {"auto"}
    assert set(ENGINES) == strategies == set(IMPLEMENTED)
    assert all(issubclass(engine, Engine) and not inspect.isabstract(engine) for engine in ENGINES.values())


def test_backend_registry_covers_every_profile_schema():
    assert set(BACKENDS) == set(PROFILES)
    for name, backend in BACKENDS.items():
        assert issubclass(backend, Backend) and not inspect.isabstract(backend) and backend.name == name


def test_a_task_type_is_named_in_at_most_two_modules():
    """The measure of issue 12: a task type's name as a string literal in at most 2 modules of launcher/."""
    sources = {path: path.read_text() for path in LAUNCHER.rglob("*.py")}
    for name in TASKS:
        where = sorted(str(p.relative_to(LAUNCHER)) for p, text in sources.items() if f'"{name}"' in text)
        assert len(where) <= 2, f"{name!r} is spelled out in {where}"


@pytest.mark.parametrize("spec", list(TASKS.values()), ids=list(TASKS))
def test_default_loss_and_metrics_build_for_every_task(spec):
    task = TaskConfig(type=spec.name, num_labels=2 if spec.needs_classes else None)
    assert task.resolved_loss.name == spec.losses[0]
    assert task.resolved_metrics == list(spec.default_metrics)
