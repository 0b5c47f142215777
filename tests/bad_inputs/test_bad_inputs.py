"""The bad-input corpus (tests/bad_inputs/cases.yaml): every malformed recipe, cluster profile, data file,
output_dir and damaged checkpoint ends in exit 2 with one short error naming what is wrong: no traceback,
no rank started (no launch/ spec folder), nothing under output_dir created or changed.

Most cases run through launcher.cli.main in-process (a fraction of a second each) and without --dry-run, so
a case the launcher wrongly accepted would really start training and fail the test; the cases marked `cli`
also go through the real `launch` executable. The damaged checkpoints are copies of a real run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, launch

from launcher import cli
from launcher.train import checkpoint

CORPUS = Path(__file__).parent
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
GOOD = CORPUS / "recipes" / "good.yaml"
CHECKPOINTS = ("checkpoint-00000001", "checkpoint-00000002")


def tree(folder: Path) -> dict[str, str]:
    """Every path under folder with a hash of its content: equal before and after means nothing changed."""
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> Path:
    """A real run's output_dir: tiny BERT, 2 steps, a checkpoint after each (with manifests, hashes included)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    done = launch(
        GOOD,
        f"model.path={tiny['bert']}",
        f"output_dir={run}",
        "train.save_every=1",
        "train.checkpoint_hash=true",
        "data.split.validation=0",
        "--procs",
        "1",
    )
    assert done.returncode == 0, done.output
    assert sorted(p.name for p in run.glob("checkpoint-*")) == list(CHECKPOINTS)
    return run


def in_process(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue() + out.getvalue()


def as_nobody(argv: list[str]) -> tuple[int, str]:
    """cli.main in a forked child that dropped root, so a chmod 000 file is really unreadable (CI runs as root)."""
    for module in (
        "launcher.planning.checks",
        "launcher.config.cluster",
        "launcher.config.loading",
        "launcher.planning.plan",
        "launcher.backends.local",
    ):
        importlib.import_module(module)  # the unprivileged child may not be able to read the installed packages
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, the modules are already imported
        code = 99
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            code, text = in_process(argv)
            os.write(write, text.encode())
        except BaseException:  # noqa: BLE001 - the forked child must never return into pytest
            import traceback

            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), text


def damage_checkpoints(out: Path, setup: str) -> None:
    newest = out / CHECKPOINTS[-1]
    if setup == "checkpoint-truncate":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif setup == "checkpoint-missing-shard":
        (newest / "optimizer.bin").unlink()
    elif setup == "checkpoint-swap":  # same size, other content: only the hash sees it
        weights = newest / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-8:] = bytes(8)
        weights.write_bytes(bytes(data))
    elif setup == "checkpoint-bad-manifest":
        (newest / checkpoint.MANIFEST_FILE).write_text('{"files": ')
    elif setup == "checkpoint-damage-all":
        for name in CHECKPOINTS:
            (out / name / "random_states_0.pkl").write_bytes(b"")


def prepare(name: str, case: dict, tmp_path: Path, request) -> tuple[list, Path]:
    """The command line of a case and its output_dir, after building what its setup needs."""
    out = tmp_path / "out"
    recipe = CORPUS / "recipes" / f"{case.get('recipe', name)}.yaml" if "cluster" not in case else GOOD
    setup = case.get("setup", "")
    argv: list = []
    if setup.startswith("recipe-") or setup == "data-fifo":
        public = Path(tempfile.mkdtemp(prefix="bad-input-"))  # reachable by recipe-unreadable's unprivileged child
        request.addfinalizer(lambda: shutil.rmtree(public, ignore_errors=True))
        os.chmod(public, 0o755)
        if setup == "data-fifo":
            os.mkfifo(public / "train.jsonl")
            argv.append(f"data.train={public / 'train.jsonl'}")
        elif setup != "recipe-missing":
            recipe = public / "recipe.yaml"
            if setup == "recipe-folder":
                recipe.mkdir()
            elif setup == "recipe-fifo":
                os.mkfifo(recipe)
            elif setup == "recipe-unreadable":
                shutil.copy(GOOD, recipe)
                os.chmod(recipe, 0)
            elif setup == "recipe-huge":  # sparse: 2 GiB on paper, nothing on disk
                with open(recipe, "wb") as f:
                    f.truncate(2 << 30)
        else:
            recipe = public / "no-such-recipe.yaml"
    if setup == "profile-missing":
        argv += ["--cluster", tmp_path / "no-such-profile.yaml"]
    if "cluster" in case:
        argv += ["--cluster", CORPUS / "cluster" / f"{case['cluster']}.yaml"]
    if setup == "output-file":
        out.write_text("results of something else\n")
    if setup.startswith("checkpoint-"):
        shutil.copytree(request.getfixturevalue("trained"), out)
        damage_checkpoints(out, setup)
    if setup.startswith("safety-"):
        argv += safety_setup(setup, out, tmp_path, request)
    if "model" in case:
        tiny = request.getfixturevalue("tiny")
        argv.append(f"model.path={tiny['bert' if case['model'] == 'tiny' else 'bert_dropout']}")
    if not case.get("keep_output_dir"):
        argv.append(f"output_dir={out}")
    argv += [a.format(out=out) for a in case.get("args", [])]
    return [recipe, *argv, "--procs", "2"], out


def assert_refused(name: str, case: dict, code: int, text: str) -> None:
    assert code == 2, f"{name}: exit {code}\n{text[-3000:]}"
    assert "Traceback" not in text, f"{name}: traceback\n{text}"
    error = text[text.index("error: ") :].rstrip()
    assert "\n\n" not in error and len(error.splitlines()) <= 6 and len(error) < 2000, (
        f"{name}: not one paragraph\n{error}"
    )
    for words in case["expect"]:
        assert words.lower() in error.lower(), f"{name}: {words!r} not in\n{error}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_before_launch(name, tmp_path, request):
    case = CASES[name]
    argv, out = prepare(name, case, tmp_path, request)
    before = tree(out)
    start = time.time()
    if case.get("setup") == "recipe-unreadable" and os.geteuid() == 0:
        code, text = as_nobody(argv)
    else:
        code, text = in_process(argv)
    seconds = time.time() - start
    assert_refused(name, case, code, text)
    assert tree(out) == before, f"{name}: output_dir changed"
    assert (out / "launch").exists() == ("launch" in before), f"{name}: a launch spec was written"
    assert not (tmp_path / "runs").exists()
    assert seconds < 10, f"{name}: took {seconds:.1f} s"
    if case.get("cli"):
        run = launch(*argv)
        assert_refused(name, case, run.returncode, run.output)
        assert tree(out) == before


def test_corpus_covers_every_file():
    files = {f"{p.parent.name}/{p.stem}" for p in CORPUS.glob("*/*.yaml")} - {"recipes/good"}
    used = {f"recipes/{c.get('recipe', n)}" for n, c in CASES.items() if "cluster" not in c}
    used |= {f"cluster/{c['cluster']}" for c in CASES.values() if "cluster" in c}
    assert files <= used, f"corpus files no case runs: {sorted(files - used)}"
    assert len(CASES) >= 40 and len(files) >= 40


def test_yaml_is_only_loaded_safely():
    """No unsafe loader anywhere in the package: a recipe can never construct Python objects."""
    unsafe = re.compile(r"yaml\.load\(|unsafe_load|FullLoader|UnsafeLoader|yaml\.Loader\b|full_load")
    found = [
        f"{p.relative_to(REPO)}:{n}"
        for p in (REPO / "launcher").rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if unsafe.search(line)
    ]
    assert found == []


def test_manifest_lists_every_file_with_size_and_hash(trained):
    for name in CHECKPOINTS:
        folder = trained / name
        files = yaml.safe_load((folder / checkpoint.MANIFEST_FILE).read_text())["files"]
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(files) == on_disk - {checkpoint.MANIFEST_FILE}
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", checkpoint.STATE_FILE} <= set(files)
        for rel, entry in files.items():
            assert entry["size"] == (folder / rel).stat().st_size
            assert entry["sha256"] == hashlib.sha256((folder / rel).read_bytes()).hexdigest()
        assert checkpoint.damage(folder) is None


def test_auto_resume_passes_over_a_damaged_newest_checkpoint(trained, tiny, tmp_path):
    """resume: auto warns and plans from the newest intact checkpoint; the damaged one is left untouched."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    damage_checkpoints(out, "checkpoint-truncate")
    before = tree(out)
    # the trained run's settings (its data split among them: the checkpoint records what it trained on)
    code, text = in_process([GOOD, f"model.path={tiny['bert']}", f"output_dir={out}", "data.split.validation=0",
                             "--procs", "1", "--dry-run"])  # fmt: skip
    assert code == 0, text
    assert f"warning: {out / CHECKPOINTS[-1]} is damaged (model.safetensors has" in text
    assert "resuming from an older checkpoint" in text
    assert "step 1 of" in text, text  # the start row of the plan: checkpoint 1
    assert tree(out) == before


def test_huge_recipe_is_refused_with_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(8 << 30)
    tracemalloc.start()
    start = time.time()
    code, text = in_process([path])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 2 and "over 1000000 bytes" in text
    assert time.time() - start < 2 and peak < 20 * 2**20, f"{peak} bytes"


# ---- safety (issue 13): the setups of the cases after "safety" in cases.yaml
class Payload:
    """Runs a command when unpickled: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def safety_setup(setup: str, out: Path, tmp_path: Path, request) -> list:
    """Build what a safety case needs; the command-line arguments it adds."""
    import torch

    from launcher import ownership

    if setup.startswith("safety-payload"):  # a real run's checkpoints, a payload planted as an attacker would:
        source = tmp_path / "shared" if setup == "safety-payload-elsewhere" else out  # manifests rewritten
        shutil.copytree(request.getfixturevalue("trained"), source)
        newest = source / CHECKPOINTS[-1]
        marker = tmp_path / "PAYLOAD_RAN"
        request.addfinalizer(lambda: _never_ran(marker))
        payload = {"state": Payload(marker)}
        target = {"safety-payload-rng": "random_states_0.pkl", "safety-payload-planted": "custom_checkpoint_0.pkl"}
        torch.save(payload, newest / target.get(setup, "optimizer.bin"))
        if setup == "safety-payload-no-manifest":
            (newest / checkpoint.MANIFEST_FILE).unlink()
        else:
            checkpoint.write_manifest(newest, hash_files=True)
        return [f"train.resume={newest}"] if setup == "safety-payload-elsewhere" else []
    if setup == "safety-foreign-folder":  # someone's results: the launcher must not touch them
        (out / "final").mkdir(parents=True)
        (out / "final" / "model.safetensors").write_bytes(b"weights of another tool")
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
        (out / "summary.json").write_text("{}")
        return []
    if setup == "safety-changed-data":  # the same rows, one appended: a resume would not continue exactly
        shutil.copytree(request.getfixturevalue("trained"), out)
        data = tmp_path / "train.jsonl"
        data.write_text(
            (REPO / "recipes/data/sms_spam/train.jsonl").read_text() + '{"text": "one more", "label": "ham"}\n'
        )
        return [f"data.train={data}"]
    if setup == "safety-home":
        return [f"output_dir={Path.home()}"]
    if setup == "safety-repository":
        return [f"output_dir={REPO}"]
    if setup == "safety-in-use":  # held by a launch (this process, through another open file) for the whole case
        stack = contextlib.ExitStack()
        stack.enter_context(ownership.claim(out))
        request.addfinalizer(stack.close)
        return []
    raise AssertionError(setup)


def _never_ran(marker: Path) -> None:
    assert not marker.exists(), "the planted payload ran"
