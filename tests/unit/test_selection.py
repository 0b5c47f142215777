"""The best checkpoint and early stopping (train.selection): which step is best, when every rank stops, and
that a resumed run counts on from its checkpoint's state."""

from __future__ import annotations

from launcher.config.training import TrainConfig
from launcher.train.selection import Selection


def config(**fields) -> TrainConfig:
    return TrainConfig.model_validate(fields)


def test_early_stopping_counts_evaluations_without_an_improvement_beyond_min_delta():
    selection = Selection(config(early_stopping={"metric": "loss", "mode": "min", "patience": 2, "min_delta": 0.05}))
    verdicts = []
    for step, loss in [(1, 1.0), (2, 0.9), (3, 0.87), (4, 0.8), (5, 0.79), (6, 0.78)]:
        selection.observe(step, {"loss": loss})
        verdicts.append(selection.should_stop())
    # 0.87 and 0.79 improve by less than 0.05: the second one in a row (step 6) stops
    assert verdicts == [False, False, False, False, False, True]


def test_keep_best_names_the_best_step_and_its_metrics():
    selection = Selection(config(keep_best={"metric": "f1_macro", "mode": "max"}))
    kept = [
        selection.observe(step, {"loss": 1.0, "f1_macro": f1}) for step, f1 in [(2, 0.5), (4, 0.7), (6, 0.7), (8, 0.6)]
    ]
    assert kept == [True, True, False, False], "a tie is not a new best"
    assert selection.best.step == 4 and selection.best.metrics == {"loss": 1.0, "f1_macro": 0.7}
    assert not selection.should_stop(), "no early stopping configured"


def test_a_nan_metric_never_improves():
    selection = Selection(config(keep_best={"metric": "loss", "mode": "min"}))
    assert not selection.observe(1, {"loss": float("nan")}) and selection.observe(2, {"loss": 3.0})


def test_the_state_in_a_checkpoint_resumes_the_count():
    train = config(
        early_stopping={"metric": "accuracy", "mode": "max", "patience": 3},
        keep_best={"metric": "accuracy", "mode": "max"},
    )
    first = Selection(train)
    for step, acc in [(1, 0.6), (2, 0.7), (3, 0.65)]:
        first.observe(step, {"accuracy": acc})
    resumed = Selection(train, first.state())  # what CheckpointState.selection carries
    assert resumed.best == first.best and resumed.evals_without_improvement == 1
    for step, acc in [(4, 0.69), (5, 0.7)]:
        assert not resumed.observe(step, {"accuracy": acc})
    assert resumed.should_stop() and resumed.best.step == 2
