"""Packed training through the real `launch` on 2 gloo ranks: its token accounting over two epochs equals the
data's exact token count (packing with gradient accumulation); a slowed rank is named as the straggler
(LAUNCHER_FAULT kind=slow); and (slow) killed and resumed, it ends with the weights of the uninterrupted run.

The data is built so that best-fit decreasing fills every bin exactly: 16 rows of 24 tokens, 16 of 16 and 48 of
8 (k words of the tiny models' WordPiece vocabulary are k + 3 tokens: [CLS], [SEP] and the EOS) pack into 32
bins of 32 tokens, 4 optimizer steps of 8 bins per epoch, so no row is dropped.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from helpers import RECIPES, final_weights, launch, metric_lines, summary

WORDS = "one two three four five six seven eight nine ten".split()
LENGTHS = [24] * 16 + [16] * 16 + [8] * 48  # tokens per row
STEPS = 8  # two epochs


def write_data(path) -> None:
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(WORDS, k=n - 3))} for n in LENGTHS]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def args(model: str, data, out, *extra: str) -> list:
    return [
        RECIPES / "sft-causal-lm.yaml",
        f"model.path={model}",
        f"data.train={data}",
        "data.validation=null",
        "data.prompt_field=null",
        "data.response_field=null",
        "task.chat_template=false",
        "data.split.validation=0",
        f"output_dir={out}",
        "data.max_length=32",
        "data.packing=pack",
        "train.precision=fp32",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        f"train.max_steps={STEPS}",
        "train.save_every=2",
        "train.optimizer.lr=1e-3",
        "train.log_every=1",
        "train.eval_every=null",
        "--procs",
        "2",
        *extra,
    ]


SLOW = {"LAUNCHER_FAULT": "rank=1,step=3,phase=step,kind=slow,seconds=0.4"}  # rank 1: 0.4 s more from step 3


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The uninterrupted run, with rank 1 slowed from step 3 (the drill changes timing, not the weights)."""
    root = tmp_path_factory.mktemp("packing")
    data = root / "train.jsonl"
    write_data(data)
    out = {"root": root, "data": data, "model": tiny["llama"]}
    out["clean"] = launch(*args(tiny["llama"], data, root / "clean"), env={"COLUMNS": "200", **SLOW}, timeout=600)
    assert out["clean"].returncode == 0, out["clean"].output[-3000:]
    return out


@pytest.fixture(scope="module")
def resumed(runs):
    """Killed at step 5 (SIGKILL of rank 1), after the checkpoint of step 4, and launched again."""
    run = runs["root"] / "run"
    killed = launch(*args(runs["model"], runs["data"], run), env={"LAUNCHER_FAULT": "rank=1,step=5,phase=step"})
    again = launch(*args(runs["model"], runs["data"], run), timeout=600)
    return killed, again, run


def test_the_plan_shows_the_bins(runs):
    """What --dry-run prints too: the plan table comes before the launch."""
    plan = runs["clean"].stdout
    assert "80 rows → 32 bins, 1024 tokens, efficiency 100.0%" in plan
    assert "│ steps per epoch" in plan and "│ 4 " in plan


@pytest.mark.slow  # two more 2-rank launches; the default suite trains packed (above) and kills/resumes unpacked
def test_killed_packed_run_resumes_to_the_uninterrupted_weights(runs, resumed):
    killed, again, run = resumed
    assert killed.returncode != 0
    assert again.returncode == 0, again.output[-3000:]
    s = summary(run)
    assert s["resumed_from"].endswith("checkpoint-00000004") and s["steps_this_launch"] == 4
    clean, after = final_weights(runs["root"] / "clean"), final_weights(run)
    assert max((clean[k] - after[k]).abs().max().item() for k in clean) <= 1e-6


def test_token_counts_over_two_epochs_are_the_datas(runs):
    s = summary(runs["root"] / "clean")
    t = s["throughput"]
    assert s["plan"]["num_train_bins"] == 32 and s["plan"]["grad_accum"] == 2
    assert t["input_tokens"] == 2 * sum(LENGTHS)  # every row of the data, twice
    assert t["trained_tokens"] == 2 * sum(n - 1 for n in LENGTHS)  # every next-token target
    assert t["computed_positions"] == t["input_tokens"] and t["padding_fraction"] == 0  # the bins are full
    assert t["input_tokens_per_s"] > 0 and t["flops"] > 0 and t["mfu"] is None  # no peak is known for a CPU
    steps = [line for line in metric_lines(runs["root"] / "clean") if "loss" in line]
    assert len(steps) == STEPS and all(line["trained_tokens_per_s"] > 0 for line in steps)
    assert len(t["step_time_s_per_rank"]) == 2


def test_the_slowed_rank_is_named_the_straggler(runs):
    assert "straggler: rank 1" in runs["clean"].output
    t = summary(runs["root"] / "clean")["throughput"]
    assert t["stragglers"] == [1]
    per_rank = t["step_time_s_per_rank"]
    assert per_rank[1]["before_first_forward_p50"] > per_rank[0]["before_first_forward_p50"] + 0.3
    lines = [line for line in metric_lines(runs["root"] / "clean") if "loss" in line]
    assert [line["straggler"] for line in lines][-3:] == [1, 1, 1]  # named once its median over the launch moved


def test_packing_is_part_of_the_checkpoints_identity(runs, tmp_path):
    """A packed run's checkpoint is not resumed unpacked: its steps count bins, not rows."""
    copy = shutil.copytree(runs["root"] / "clean", tmp_path / "copy")
    shutil.rmtree(copy / "final")
    (copy / "summary.json").unlink()
    refused = launch(*args(runs["model"], runs["data"], copy, "data.packing=none", "--dry-run"))
    assert refused.returncode == 2 and "packing: checkpoint 'pack', recipe 'none'" in refused.output
