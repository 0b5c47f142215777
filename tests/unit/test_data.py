"""Tokenization (prompt masking, word-label alignment, batched = row by row), the tokenized cache (reused,
keyed by content, memory-mapped splits), weighted mixtures (exact seeded proportions) and the stateless
samplers (map-style and streaming: the same sample stream resumed, and at any world size)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from helpers import RECIPES

from launcher.config.loading import load_recipe
from launcher.planning.checks import check_recipe
from launcher.planning.data_cache import cache_root, make_data_plan
from launcher.planning.plan import make_plan
from launcher.train.cache import prepare_cache
from launcher.train.data import make_sampler, open_data
from launcher.train.model import load_tokenizer
from launcher.train.streaming import StreamingTrain
from launcher.train.tasks import IGNORE, as_columns, as_rows, hooks


def write_recipe(tmp_path, model: str, body: str, *overrides: str):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {model}}}\n{body}\noutput_dir: {tmp_path / 'out'}\n")
    return load_recipe(path, list(overrides))


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepared(recipe, tokenizer):
    data_plan = make_data_plan(recipe, check_recipe(recipe))
    prepare_cache(recipe, data_plan, tokenizer, say=lambda _: None)
    return data_plan


def test_sft_masks_the_prompt_with_and_without_chat_template(tmp_path, tiny):
    for chat in (False, True):
        recipe = write_recipe(
            tmp_path,
            tiny["llama"],
            f"task: {{type: causal_lm, chat_template: {str(chat).lower()}}}\n"
            f"data: {{train: {RECIPES / 'data/chat/train.jsonl'}, prompt_field: prompt, "
            "response_field: response, max_length: 64}",
        )
        tokenizer = load_tokenizer(recipe)
        row = {"prompt": "What is one plus two?", "response": "one plus two is three."}
        encoded = hooks(recipe, tokenizer).tokenize(row)
        labels, ids = encoded["labels"], encoded["input_ids"]
        answer = [t for t, label in zip(ids, labels) if label != IGNORE]
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "one plus two is three."
        assert answer[-1] == tokenizer.eos_token_id
        assert encoded["weight"] == len(answer)
        if chat:
            assert "< user >" in tokenizer.decode(ids) and "< assistant >" in tokenizer.decode(ids)


def test_token_labels_on_first_subword_only(tmp_path, tiny):
    recipe = write_recipe(
        tmp_path,
        tiny["bert"],
        "task: {type: token_classification, labels: [O, B-LOC]}\n"
        f"data: {{train: {RECIPES / 'data/ner/train.jsonl'}, text_field: tokens, label_field: tags}}",
    )
    tokenizer = load_tokenizer(recipe)
    encoded = hooks(recipe, tokenizer).tokenize({"text": ["Quito", "is", "unforgettable"], "label": [1, 0, 0]})
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    kept = [(p, label) for p, label in zip(pieces, encoded["labels"]) if label != IGNORE]
    assert [label for _, label in kept] == [1, 0, 0] and encoded["weight"] == 3
    assert len(pieces) > 5  # sub-words and specials exist and are ignored


BATCHED = {  # task → (model, recipe body, rows)
    "pair": ("bert", "task: {type: sequence_classification, num_labels: 2}\ndata: {train: x, text_pair_field: b}",
             [{"text": "a cat", "text_pair": "on a mat", "label": 1}, {"text": "no", "text_pair": "yes", "label": 0}]),
    "multi_label": ("bert", "task: {type: multi_label_classification, num_labels: 3}\ndata: {train: x}",
                    [{"text": "red and blue", "label": [1.0, 0.0, 1.0]}, {"text": "green", "label": [0.0, 1.0, 0.0]}]),
    "tags": ("bert", "task: {type: token_classification, labels: [O, B]}\ndata: {train: x}",
             [{"text": ["Quito", "is", "far"], "label": [1, 0, 0]}, {"text": ["unforgettable"], "label": [0]}]),
    "text": ("llama", "task: {type: causal_lm}\ndata: {train: x, max_length: 8}",
             [{"text": "one two three four five six seven eight nine"}, {"text": "ten"}]),
    "sft": ("llama", "task: {type: causal_lm}\ndata: {train: x, prompt_field: p, response_field: r, max_length: 12}",
            [{"prompt": "What is two?", "response": "two is two."}, {"prompt": "a " * 20, "response": "b"}]),
    "chat": ("llama", "task: {type: causal_lm, chat_template: true}\ndata: {train: x, prompt_field: p, "
             "response_field: r}", [{"prompt": "Hi?", "response": "hello."}, {"prompt": "Yes?", "response": "no."}]),
    "seq2seq": ("t5", "task: {type: seq2seq}\ndata: {train: x, prompt_field: p, response_field: r}",
                [{"prompt": "digits: four", "response": "4"}, {"prompt": "digits: one two", "response": "1 2"}]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BATCHED))
def test_batched_tokenization_equals_row_by_row(name, tmp_path, tiny):
    """What the cache's batched datasets.map calls gives each row exactly what `tokenize(row)` gives; a task that
    overrides only `tokenize` gets it called row by row."""
    model, body, rows = BATCHED[name]
    recipe = write_recipe(tmp_path, tiny[model], body)
    task = hooks(recipe, load_tokenizer(recipe))
    one_by_one = [task.tokenize(row) for row in rows]
    assert as_rows(task.tokenize_batch(as_columns(rows))) == one_by_one

    class Shouting(type(task)):
        def tokenize(self, row):
            return {**super().tokenize(row), "weight": 99}

    overridden = Shouting(recipe, task.tok)
    assert [r["weight"] for r in as_rows(overridden.tokenize_batch(as_columns(rows)))] == [99, 99]


def test_tokenized_cache_is_reused_keyed_by_content_and_memory_mapped(tmp_path, tiny):
    data = tmp_path / "d.jsonl"
    write_rows(data, [{"text": f"row {i}", "label": i % 2} for i in range(20)])
    recipe = write_recipe(
        tmp_path, tiny["bert"], f"task: {{type: sequence_classification, num_labels: 2}}\ndata: {{train: {data}}}"
    )
    tokenizer = load_tokenizer(recipe)
    first = prepared(recipe, tokenizer)
    folder = cache_root(recipe) / first.sources[0].key
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    again = make_data_plan(recipe, check_recipe(recipe))
    assert again.sources[0].cached and again.sources[0].key == first.sources[0].key
    assert prepare_cache(recipe, again, tokenizer, say=print)[0].endswith(f"in the cache ({folder})")
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    opened = open_data(recipe, again)
    task = hooks(recipe, tokenizer)
    from launcher.planning.data_files import split_indices

    train_rows = split_indices(20, recipe, 0)["train"]
    assert len(opened.train) == len(train_rows) == 18 and len(opened.validation) == 2
    expected = [task.tokenize({"text": f"row {i}", "label": i % 2}) for i in train_rows]
    assert opened.train.rows(range(18)) == expected and opened.train[3] == expected[3]
    assert list(opened.train[1::4]) == expected[1::4]
    assert opened.train.lengths().tolist() == [len(r["input_ids"]) for r in expected]
    assert opened.label_counts(2) == np.bincount([i % 2 for i in train_rows]).tolist()
    data.write_text(data.read_text().replace("row 3", "row three"))
    changed = make_data_plan(recipe, check_recipe(recipe))
    assert changed.sources[0].key != first.sources[0].key and not changed.sources[0].cached


def mixture_setup(tmp_path, tiny, mix_by: str, world: int = 1, micro: int = 4):
    """Two sources, 60 short rows and 40 long ones, weighted 3:1."""
    short = write_rows(tmp_path / "short.jsonl", [{"text": f"s{i}", "label": 0} for i in range(60)])
    long = write_rows(tmp_path / "long.jsonl", [{"text": f"l{i} " + "word " * 20, "label": 1} for i in range(40)])
    recipe = write_recipe(
        tmp_path,
        tiny["bert"],
        "task: {type: sequence_classification, num_labels: 2}\n"
        f"data: {{train: [{{path: {short}, weight: 3}}, {{path: {long}, weight: 1}}], split: {{validation: 0}}, "
        f"mix_by: {mix_by}}}\ntrain: {{batch_size: 8, micro_batch_size: {micro}, epochs: 3}}",
    )
    data_plan = prepared(recipe, load_tokenizer(recipe))
    summary = check_recipe(recipe)
    plan = make_plan(recipe, num_train_samples=summary.counts["train"], procs_per_node=world, data=data_plan)
    return recipe, plan, open_data(recipe, data_plan)


@pytest.mark.parametrize("mix_by", ["rows", "tokens"])
def test_mixture_proportions_are_exact_every_epoch(mix_by, tmp_path, tiny):
    recipe, plan, data = mixture_setup(tmp_path, tiny, mix_by)
    sampler = make_sampler(recipe, plan, data)
    per_epoch = sampler.mixture.per_epoch
    assert sum(per_epoch) == 100 and plan.steps_per_epoch == 12
    lengths = data.train.lengths()
    if mix_by == "rows":
        assert per_epoch == [75, 25]
    else:  # the long rows are about 8x longer: the 1/4 share of tokens takes far fewer of them
        tokens = [per_epoch[0] * lengths[:60].mean(), per_epoch[1] * lengths[60:].mean()]
        assert abs(tokens[1] / sum(tokens) - 0.25) < 0.02 and per_epoch[1] < 10
    for epoch in range(3):
        order = sampler.order(epoch)
        assert Counter((order >= 60).tolist()) == {False: per_epoch[0], True: per_epoch[1]}
    short_seen = [set(sampler.order(e)[sampler.order(e) < 60].tolist()) for e in range(2)]
    assert len(short_seen[0]) == 60  # 75 draws of 60 rows: every row once before any twice
    drawn = [i for step in range(plan.steps_per_epoch) for i in sum(sampler.batch(step, 0).micro_batches, [])]
    observed = sum(i >= 60 for i in drawn) / len(drawn)  # the 96 samples the epoch's full batches hold
    assert abs(observed - per_epoch[1] / 100) < 0.06


def test_mixture_resumes_to_the_same_stream_at_any_world_size(tmp_path, tiny):
    """The stateless sampler: a sampler made fresh at a later step (a resume), twice, and one on 2 ranks give the
    same global batches in the same order as one uninterrupted 1-rank sampler."""
    recipe, one_rank, data = mixture_setup(tmp_path, tiny, "rows", world=1, micro=4)
    two_ranks = make_plan(recipe, num_train_samples=100, procs_per_node=2, data=one_rank.data)
    reference = make_sampler(recipe, one_rank, data)
    stream = [sum(reference.batch(step, 0).micro_batches, []) for step in range(30)]
    for resumed_at in (7, 7, 13):
        fresh = make_sampler(recipe, one_rank, data)
        assert [sum(fresh.batch(s, 0).micro_batches, []) for s in range(resumed_at, 30)] == stream[resumed_at:]
    on_two = make_sampler(recipe, two_ranks, data)
    for step in range(5, 30):
        batches = [on_two.batch(step, rank) for rank in (0, 1)]
        interleaved = [i for a in range(two_ranks.grad_accum) for b in batches for i in b.micro_batches[a]]
        assert interleaved == stream[step]
        assert batches[0].global_weight == batches[1].global_weight == reference.batch(step, 0).global_weight


def streaming_setup(tmp_path, tiny, world: int):
    a = write_rows(tmp_path / "a.jsonl", [{"text": f"a{i}", "label": 0} for i in range(37)])
    b = write_rows(tmp_path / "b.jsonl", [{"text": f"b{i} more", "label": 1} for i in range(23)])
    val = write_rows(tmp_path / "v.jsonl", [{"text": f"v{i}", "label": i % 2} for i in range(6)])
    recipe = write_recipe(
        tmp_path,
        tiny["bert"],
        "task: {type: sequence_classification, num_labels: 2}\n"
        f"data: {{train: [{{path: {a}, weight: 2}}, {{path: {b}, weight: 1}}], validation: {val}, "
        "streaming: true, shuffle_buffer: 8}\n"
        f"train: {{batch_size: 8, micro_batch_size: {8 // world // 2}, max_steps: 400}}",
    )
    summary = check_recipe(recipe)
    data_plan = prepared(recipe, load_tokenizer(recipe))
    plan = make_plan(recipe, num_train_samples=summary.counts["train"], procs_per_node=world, data=data_plan)
    return recipe, plan, hooks(recipe, load_tokenizer(recipe))


def test_streaming_resumes_by_sample_position_at_any_world_size(tmp_path, tiny):
    recipe, one, task = streaming_setup(tmp_path, tiny, 1)
    _, two, _ = streaming_setup(tmp_path, tiny, 2)
    assert one.steps_per_epoch == 400 and one.data.streaming

    def texts(train, step, rank):
        batch = train.batch(step, rank)
        ids = [train[i]["input_ids"] for m in batch.micro_batches for i in m]
        return [task.tok.decode(row, skip_special_tokens=True) for row in ids]

    reference = StreamingTrain(recipe, one, task)
    stream = [texts(reference, s, 0) for s in range(12)]
    flat = [t for step in stream for t in step]
    assert sum(t.startswith("a") for t in flat) / len(flat) == pytest.approx(2 / 3, abs=0.05)
    assert len(set(flat[:37])) > 30  # the shuffle buffer mixes, and sources restart when they end
    for _ in range(2):  # resumed at step 5, twice: the same samples
        resumed = StreamingTrain(recipe, one, task)
        assert [texts(resumed, s, 0) for s in range(5, 12)] == stream[5:]
    on_two = StreamingTrain(recipe, two, task)
    for step in range(5, 12):
        per_rank = [on_two.batch(step, r) for r in (0, 1)]
        assert per_rank[0].micro_batches != per_rank[1].micro_batches
    resumed_two = [StreamingTrain(recipe, two, task), StreamingTrain(recipe, two, task)]
    for step in range(5, 12):
        ranks = [texts(resumed_two[r], step, r) for r in (0, 1)]
        micro = two.micro_batch_size
        merged = [t for a in range(two.grad_accum) for r in (0, 1) for t in ranks[r][a * micro : (a + 1) * micro]]
        assert merged == stream[step]
