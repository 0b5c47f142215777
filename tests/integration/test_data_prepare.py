"""The tokenized cache is written before any rank starts, by one process, and training only opens it.

One real 2-rank `launch` with a 5 s collective timeout on a mixture of two sources, while a `launch prepare`
of the same recipe runs at the same time on the same (empty) cache: the preparation is made to take 8 s
(LAUNCHER_FAULT=phase=prepare,kind=slow), longer than any collective may wait, and the run still trains,
because no process group exists while it runs. One of the two processes writes each entry (with 2 tokenizing
processes, data.num_proc=2), the other waits on its lock file; the entries equal what one process writes
(num_proc=1, in this test's process); the plan of a later launch says the data is in the cache.
Slow (make test-all): data.streaming on 2 ranks, a rank killed after a checkpoint, resumed on 1 rank, ends
with the uninterrupted run's weights (the default suite covers the stream's resume and world-size invariance
in tests/unit/test_data.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import QUICKSTART, RECIPES, REPO, launch, summary

from launcher import cli
from launcher.config.loading import load_recipe

SLOW_PREPARE_S = 8


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def mixture_args(model: str, tmp_path, out) -> list:
    extra = write_rows(tmp_path / "extra.jsonl", [{"text": f"extra message {i}", "label": "ham"} for i in range(40)])
    train = RECIPES / "data/sms_spam/train.jsonl"
    return [
        QUICKSTART,
        f"model.path={model}",
        f"output_dir={out}",
        f"data.train=[{{path: {train}, weight: 3}}, {{path: {extra}, weight: 1}}]",
        "data.validation=null",
        "data.test=null",
        "data.split.validation=0",
        "data.num_proc=2",
        "data.max_length=32",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.eval_every=null",
        "distributed.collective_timeout=5",
        "distributed.hang_timeout=0",
    ]


def test_tokenization_before_the_ranks_one_writer_and_the_same_cache(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    env = {"LAUNCHER_CACHE_DIR": str(cache), "LAUNCHER_FAULT": f"phase=prepare,kind=slow,seconds={SLOW_PREPARE_S}"}
    args = mixture_args(tiny["bert"], tmp_path, tmp_path / "run")
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    prepare = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "prepare", *map(str, args)],
        env=full_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = time.time()
    trained = launch(*args, "--procs", "2", env=env, timeout=600)
    prepared = prepare.communicate(timeout=600)[0]
    assert trained.returncode == 0, trained.output[-4000:]
    assert prepare.returncode == 0, prepared[-4000:]
    both = trained.output + prepared
    assert len(re.findall(r"tokenized [\d,]+ rows", both)) == 2, both  # two entries, each written once
    assert "written by another process" in both or "in the cache" in both
    assert "prepared: the tokenized cache is in" in prepared
    s = summary(tmp_path / "run")
    # the 8 s of preparation lay between the launch's planning and its ranks' start, outside any collective
    timings = s["timings"]
    assert timings["rank_start_s"] + timings["recipe_and_plan_s"] >= SLOW_PREPARE_S or "in the cache" in trained.output
    sources = s["plan"]["data"]["sources"]
    assert [x["samples_per_epoch"] for x in sources] == [630, 210] and [x["rows"] for x in sources] == [800, 40]
    print(f"launch and launch prepare at once, 2 ranks, 5 s collective timeout: {time.time() - started:.0f} s")

    # the plan of the next launch finds the cache; one process with one tokenizer writes the same tables
    monkeypatch.setenv("LAUNCHER_CACHE_DIR", str(cache))
    monkeypatch.setenv("COLUMNS", "250")  # the plan table unwrapped
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main([str(a) for a in args] + ["--procs", "2", "--dry-run"]) == 0
    assert "ready in the cache" in out.getvalue() and "630 samples per epoch (75.0% by rows" in out.getvalue()
    from launcher.planning.data_cache import cache_root
    from launcher.train.data import open_prepared

    overrides = [str(a) for a in args[1:]]
    recipe = load_recipe(QUICKSTART, overrides)
    alone = load_recipe(QUICKSTART, [*overrides, f"data.cache_dir={tmp_path / 'alone'}", "data.num_proc=1"])
    shared, single = open_prepared(recipe, say=lambda _: None), open_prepared(alone, say=lambda _: None)
    assert cache_root(alone) != cache_root(recipe)
    assert len(shared.train) == 840 and list(shared.train) == list(single.train)
    manifests = [json.loads(p.read_text()) for p in cache_root(recipe).glob("*/manifest.json")]
    assert sorted(m["num_proc"] for m in manifests) == [2, 2]  # data.num_proc=2 asked for


def streaming_args(model: str, tmp_path, out) -> list:
    val = write_rows(tmp_path / "val.jsonl", [{"text": f"held out {i}", "label": "ham"} for i in range(8)])
    return [
        QUICKSTART,
        f"model.path={model}",
        f"output_dir={out}",
        "data.streaming=true",
        f"data.validation={val}",
        "data.test=null",
        "data.shuffle_buffer=64",
        "data.max_length=32",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=6",
        "train.save_every=3",
        "train.eval_every=null",
        "train.optimizer.lr=1e-3",
    ]


@pytest.mark.slow
def test_streaming_killed_and_resumed_on_another_world_size(tiny, tmp_path):
    """2 ranks, 6 steps streamed, uninterrupted: the reference. The same run with rank 1 SIGKILLed entering
    step 5 leaves the step-3 checkpoint; relaunched on 1 rank, it reads past the 24 samples already trained on
    and ends with the reference's weights."""
    from helpers import final_weights

    ref = launch(*streaming_args(tiny["bert"], tmp_path, tmp_path / "ref"), "--procs", "2", timeout=600)
    assert ref.returncode == 0, ref.output[-4000:]
    assert "streamed (first rows checked)" in ref.output
    run = tmp_path / "killed"
    killed = launch(
        *streaming_args(tiny["bert"], tmp_path, run), "--procs", "2", env={"LAUNCHER_FAULT": "rank=1,step=5"}
    )
    assert killed.returncode != 0 and not (run / "summary.json").exists()
    again = launch(*streaming_args(tiny["bert"], tmp_path, run), "--procs", "1", timeout=600)
    assert again.returncode == 0, again.output[-4000:]
    assert summary(run)["resumed_from"].endswith("checkpoint-00000003") and summary(run)["steps_this_launch"] == 3
    a, b = final_weights(tmp_path / "ref"), final_weights(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
