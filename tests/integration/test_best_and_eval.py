"""Early stopping, the best checkpoint and evaluating without training, through the real `launch` (2 gloo
ranks for training, 1 for the evaluations: the metrics must not depend on the world size).

The expected stopping step and best step are recomputed here from the validation losses in metrics.jsonl,
by the rules the recipe states, not read back from the run.
"""

from __future__ import annotations

import pytest
from helpers import launch, metric_lines, small_run, summary

from launcher.train import checkpoint

PATIENCE, MIN_DELTA, EVAL_EVERY, STEPS = 2, 0.002, 2, 40
SELECTION = [
    "train.max_steps=40",
    f"train.eval_every={EVAL_EVERY}",
    "train.save_every=1000",
    "train.keep_last=1",
    "train.optimizer.lr=3e-3",
    f"train.early_stopping={{metric: loss, mode: min, patience: {PATIENCE}, min_delta: {MIN_DELTA}}}",
    "train.keep_best={metric: loss, mode: min}",
    "train.final=best",
]


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("best") / "run"
    run = launch(*small_run(tiny["bert"], out, *SELECTION), "--procs", "2")
    assert run.returncode == 0, run.output[-4000:]
    return out, run


def expected_stop_and_best(losses: list[tuple[int, float]]) -> tuple[int, int]:
    """(the step early stopping ends at, the best step) by the recipe's rules, from the validation losses."""
    stopping_best, without, best, best_step = None, 0, None, None
    for step, loss in losses:
        if best is None or loss < best:
            best, best_step = loss, step
        if stopping_best is None or loss < stopping_best - MIN_DELTA:
            stopping_best, without = loss, 0
        else:
            without += 1
        if without >= PATIENCE and step < STEPS:
            return step, best_step
    return STEPS, best_step


def numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def test_every_rank_stops_early_at_the_same_step_and_final_holds_the_best(stopped):
    out, run = stopped
    s = summary(out)
    lines = metric_lines(out)
    losses = [(r["step"], r["metrics"]["loss"]) for r in lines if r.get("split") == "validation"]
    stop, best = expected_stop_and_best(losses)
    assert stop < STEPS, f"the run should stop early: {losses}"
    assert s["stopped_early_at"] == stop == s["steps"] and s["best"]["step"] == best and s["final_step"] == best
    assert [r["step"] for r in lines if "split" not in r] == list(range(1, stop + 1)), "no rank trained further"
    assert len(set(s["param_checksum_per_rank"])) == 1
    assert f"early stopping at step {stop}" in run.stderr
    # the best checkpoint stays beside keep_last: 1 (the newest); final/ is the best's model
    assert [p.name for p in checkpoint.complete(out)] == [f"checkpoint-{best:08d}", f"checkpoint-{stop:08d}"]
    assert checkpoint.read_state(out / f"checkpoint-{stop:08d}").stopped_early
    assert s["metrics"]["validation"] == s["best"]["metrics"]
    # the closing line leads with the final metrics per split, then the best step, tokens and wall time
    closing = run.stdout.strip().splitlines()[-2]
    assert closing.startswith("done: validation loss") and " test loss " in closing
    assert f"best step {best}" in closing and f"{s['trained_tokens']:,} tokens" in closing
    assert s["trained_tokens"] > stop * 8 and s["wall_time_s"] > 0
    assert list(s)[:7] == ["schema_version", "status", "metrics", "best", "stopped_early_at", "trained_tokens",
                           "wall_time_s"]  # fmt: skip


@pytest.mark.slow  # the rank side of stopped_early; the default suite checks the flag in the checkpoint above
def test_a_relaunch_of_an_early_stopped_run_trains_no_further(stopped, tiny):
    out, _ = stopped
    before, lines = summary(out), metric_lines(out)
    again = launch(*small_run(tiny["bert"], out, *SELECTION), "--procs", "1")
    assert again.returncode == 0, again.output[-3000:]
    s = summary(out)
    assert s["steps"] == before["steps"] and s["steps_this_launch"] == 0 and s["best"] == before["best"]
    assert [r for r in metric_lines(out) if "split" not in r] == [r for r in lines if "split" not in r]


def test_eval_of_the_exported_model_gives_its_metrics_on_one_rank(stopped, tiny):
    """`launch eval --model final/` on 1 rank: the validation and test metrics the 2-rank run reported for
    the same model; nothing trained, saved or exported; its own folder under OUTPUT_DIR/eval/."""
    out, _ = stopped
    trained = summary(out)
    run = launch("eval", *small_run(tiny["bert"], out, *SELECTION), "--model", out / "final", "--procs", "1")
    assert run.returncode == 0, run.output[-4000:]
    s = summary(out / "eval" / "final")
    assert s["steps"] == 0 and s["final_model"] is None and s["world_size"] == 1
    for split in ("validation", "test"):
        assert numbers(s["metrics"][split]) == pytest.approx(numbers(trained["metrics"][split]), rel=1e-5), split
        assert s["metrics"][split]["per_class"] == trained["metrics"][split]["per_class"], "counts: exact"
    assert not checkpoint.complete(out / "eval" / "final") and not (out / "eval" / "final" / "final").exists()
    assert run.stdout.strip().splitlines()[-2].startswith("done: validation loss")
    assert "evaluation only" in run.stdout


@pytest.mark.slow  # the same path as the exported model's evaluation above, without --model
def test_eval_of_the_base_model_is_a_baseline(stopped, tiny):
    out, _ = stopped
    run = launch("eval", *small_run(tiny["bert"], out, *SELECTION), "--procs", "1")
    assert run.returncode == 0, run.output[-4000:]
    base = summary(out / "eval" / "base")
    assert base["steps"] == 0 and base["metrics"]["validation"]["loss"] > summary(out)["best"]["value"]
