"""Readers, the seeded split, tokenization (prompt masking, word-label alignment) and the cache."""

from __future__ import annotations

import json

import pytest
from helpers import RECIPES

from launcher.config.loading import load_recipe
from launcher.planning.checks import check_recipe
from launcher.train.data import cache_root, prepare
from launcher.train.model import load_tokenizer
from launcher.train.tasks import IGNORE, hooks


def write_recipe(tmp_path, model: str, body: str):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {model}}}\n{body}\noutput_dir: {tmp_path / 'out'}\n")
    return load_recipe(path)


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "saved"])
def test_readers_agree(kind, tmp_path, tiny):
    import datasets

    rows = [{"text": f"message {i}", "label": "spam" if i % 3 == 0 else "ham"} for i in range(30)]
    dataset = datasets.Dataset.from_list(rows)
    target = {
        "csv": tmp_path / "d.csv",
        "tsv": tmp_path / "d.tsv",
        "parquet": tmp_path / "d.parquet",
        "saved": tmp_path / "saved",
    }[kind]
    if kind == "csv":
        dataset.to_csv(str(target), index=False)
    elif kind == "tsv":
        dataset.to_csv(str(target), index=False, sep="\t")
    elif kind == "parquet":
        dataset.to_parquet(str(target))
    else:
        dataset.save_to_disk(str(target))
    recipe = write_recipe(
        tmp_path,
        tiny["bert"],
        f"task: {{type: sequence_classification, labels: [ham, spam]}}\n"
        f"data: {{train: {target}, split: {{validation: 0.2, test: 0.1}}}}",
    )
    splits = check_recipe(recipe)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (21, 6, 3)
    everything = splits.train + splits.validation + splits.test
    assert sorted(r["text"] for r in everything) == sorted(r["text"] for r in rows)
    assert {r["text"]: r["label"] for r in everything}["message 3"] == 1
    again = check_recipe(recipe)
    assert again.validation == splits.validation, "the split is seeded"


def test_headerless_csv_like_the_sms_collection(tmp_path, tiny):
    data = tmp_path / "spam.tsv"
    data.write_text("ham\tsee you at 5\nspam\tWIN a prize now\nham\tok\n")
    recipe = write_recipe(
        tmp_path,
        tiny["bert"],
        "task: {type: sequence_classification, labels: [ham, spam]}\n"
        f"data: {{train: {data}, csv_header: false, csv_columns: [label, text], split: {{validation: 0}}}}",
    )
    assert [r["label"] for r in check_recipe(recipe).train] == [0, 1, 0]


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


def test_tokenized_cache_is_reused_and_keyed_by_content(tmp_path, tiny):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(20)))
    recipe = write_recipe(
        tmp_path, tiny["bert"], f"task: {{type: sequence_classification, num_labels: 2}}\ndata: {{train: {data}}}"
    )
    tokenizer = load_tokenizer(recipe)
    before = set(cache_root().iterdir()) if cache_root().exists() else set()
    first = prepare(recipe, check_recipe(recipe), tokenizer)
    made = {p for p in cache_root().iterdir() if p.is_dir()} - before
    assert len(made) == 1
    stamp = (next(iter(made)) / "COMPLETE").stat().st_mtime_ns
    second = prepare(recipe, check_recipe(recipe), tokenizer)
    assert second == first and (next(iter(made)) / "COMPLETE").stat().st_mtime_ns == stamp
    data.write_text(data.read_text().replace("row 3", "row three"))
    prepare(recipe, check_recipe(recipe), tokenizer)
    assert len({p for p in cache_root().iterdir() if p.is_dir()} - before) == 2
