"""The hang watchdog's verdict on heartbeats (the rank behind is the stuck one), the frames it quotes, and the
timeout settings' validation and defaults (real hung ranks: tests/integration/test_watchdog.py)."""

from __future__ import annotations

import pytest

from launcher.backends.watchdog import behind, top_frames
from launcher.config.loading import load_recipe
from launcher.errors import RecipeError


def test_the_rank_behind_is_the_stuck_one():
    def beat(rank, step, phase):
        return {"rank": rank, "step": step, "phase": phase}

    waiting, hung = beat(0, 7, "backward"), beat(1, 7, "forward")
    assert behind([waiting, hung, beat(2, 7, "optimizer")]) == [hung]
    assert behind([beat(0, 8, "data"), beat(1, 7, "save")]) == [beat(1, 7, "save")]
    assert behind([waiting, beat(1, 7, "backward")]) == [waiting, beat(1, 7, "backward")]  # all at one point


def test_top_frames_come_from_the_training_thread(tmp_path):
    dump = tmp_path / "stack.txt"
    dump.write_text(
        'Thread 0x1 (most recent call first):\n  File "/x/tqdm/_monitor.py", line 69 in run\n\n'
        'Current thread 0x2 (most recent call first):\n  File "/x/launcher/train/run.py", line 79 in _hang\n'
        '  File "/x/launcher/train/worker.py", line 44 in main\n'
    )
    assert top_frames(dump) == [
        'File "/x/launcher/train/run.py", line 79 in _hang',
        'File "/x/launcher/train/worker.py", line 44 in main',
    ]
    assert top_frames(tmp_path / "missing.txt") == []


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["distributed.hang_timeout=-1"], "hang_timeout"),
        (["distributed.collective_timeout=0"], "collective_timeout"),
        (["distributed.hang_timeout=700"], "hang_timeout (700 s) must be below collective_timeout (600 s)"),
    ],
)
def test_timeouts_are_validated(tmp_path, overrides, field):
    from helpers import RECIPES

    with pytest.raises(RecipeError) as error:
        load_recipe(RECIPES / "quickstart.yaml", [f"output_dir={tmp_path}", *overrides])
    assert field in str(error.value)


def test_timeouts_have_sane_defaults_and_zero_turns_the_watchdog_off(tmp_path):
    from helpers import RECIPES

    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"output_dir={tmp_path}"])
    assert (recipe.distributed.hang_timeout, recipe.distributed.collective_timeout) == (300, 600)
    off = load_recipe(
        RECIPES / "quickstart.yaml",
        [f"output_dir={tmp_path}", "distributed.hang_timeout=0", "distributed.collective_timeout=30"],
    )
    assert off.distributed.hang_timeout == 0
