"""Hostile recipes and profiles against the Slurm job script, with stub `sbatch`, `srun`, `scancel` and `module`
that this test writes: the real `launch` submits through the stub sbatch, which reads the #SBATCH lines the way
sbatch 22.05 does (a port of its `_opt_batch_script` / `_get_argument`: words split on spaces, quotes and
backslashes stripped, an unquoted # ends the line, reading stops at the first command), writes the job's output
to the file its --output names (the file name pattern expanded as Slurm does), and runs the script under bash.
Nothing a value holds may execute, every directive must survive, and the log must be the run's own.

Values that cannot be made safe (a line break in any of them, a Slurm name or time of the wrong syntax) are
refused before anything is written: tests/bad_inputs/cases.yaml.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import RECIPES

from launcher import cli

SBATCH = r'''#!{python}
"""Stub sbatch: parse the directives as sbatch 22.05 does, then run the job script under bash (synchronously)."""
import json, os, re, subprocess, sys

def get_argument(line):
    """sbatch's _get_argument: (word or None, characters consumed)."""
    i = 0
    while i < len(line) and line[i].isspace():
        i += 1
    if i == len(line):
        return None, i
    word, quoted, q_char, escape = [], False, "", False
    while i < len(line) and (quoted or not line[i].isspace()) and line[i] != "\n":
        c = line[i]
        if escape:
            escape = False
        elif c == "\\":
            escape = True; i += 1; continue
        elif quoted:
            if c == q_char:
                quoted = False; i += 1; continue
        elif c in "\"'":
            quoted, q_char = True, c; i += 1; continue
        elif c == "#":
            break
        word.append(c); i += 1
    if quoted:
        sys.exit(f"sbatch: error: unmatched {{q_char}} in {{line!r}}")
    return ("".join(word) if word else None), i

def directives(text):
    out = []
    for line in text.split("\n"):
        if line.startswith("#SBATCH"):
            rest = line[len("#SBATCH"):]
            while True:
                word, used = get_argument(rest)
                if word is None:
                    break
                out.append(word)
                rest = rest[used:]
        elif line.strip() and not line.lstrip().startswith("#"):
            break  # the first command: sbatch reads no further directives
    return out

def expand(pattern, job_id, name):
    """Slurm's file name pattern: %j the job id, %x the job name, %% a plain %."""
    return re.sub(r"%(.)", lambda m: {{"%": "%", "j": job_id, "x": name}}.get(m.group(1), m.group(0)), pattern)

script = sys.argv[-1]
found = directives(open(script).read())
record = os.environ["STUB_RECORD"]
options = dict(w.split("=", 1) if "=" in w else (w, "") for w in found)
job_id = "4242"
log = expand(options.get("--output", "slurm-%j.out"), job_id, options.get("--job-name", "sbatch"))
with open(os.path.join(record, "sbatch.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "directives": found, "log": log}}, f)
env = {{**os.environ, "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_RESTART_COUNT": "0"}}
with open(log, "a") as out:
    done = subprocess.run(["bash", script], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=record)
with open(os.path.join(record, "job-exit"), "w") as f:
    f.write(str(done.returncode))
print(job_id)
'''

RECORDER = r'''#!{python}
"""Stub {name}: record argv (and the profile's variables) and succeed."""
import json, os, sys
with open(os.path.join(os.environ["STUB_RECORD"], "{name}.jsonl"), "a") as f:
    env = {{k: os.environ.get(k) for k in os.environ.get("STUB_ENV", "").split(",") if k}}
    f.write(json.dumps({{"argv": sys.argv[1:], "env": env}}) + "\n")
'''

# Each character that the shell or sbatch reads specially, in the run directory's name: spaces, comment, file name
# pattern, command substitution (both kinds), quotes of both kinds, separators, a glob, a variable.
HOSTILE_DIR = """run x#y %j %x $(touch owned-1) `touch owned-2` 'q' "dq" ; touch owned-3 & | * $HOME"""
HOSTILE_ENV = {
    "SUBSTITUTED": "$(touch owned-4)",
    "BACKTICKS": "`touch owned-5`",
    "QUOTES": "'; touch owned-6; echo '\"",
}


def stubs(folder: Path) -> Path:
    folder.mkdir()
    (folder / "sbatch").write_text(SBATCH.format(python=sys.executable))
    for name in ("srun", "scancel", "module"):
        (folder / name).write_text(RECORDER.format(python=sys.executable, name=name))
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def records(record: Path, name: str) -> list[dict]:
    path = record / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv: list) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue() + err.getvalue()


@pytest.fixture
def slurm_stubs(tmp_path, monkeypatch):
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("PATH", f"{stubs(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_RECORD", str(record))
    monkeypatch.setenv("STUB_ENV", ",".join(HOSTILE_ENV))
    monkeypatch.chdir(record)  # where a command that escaped would write its files
    return record


def test_hostile_values_never_run_and_every_directive_survives(slurm_stubs, tmp_path):
    record = slurm_stubs
    run_dir = tmp_path / HOSTILE_DIR
    python = tmp_path / "my venv" / "bin" / "python $(touch owned-7)"
    profile = tmp_path / "hostile.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "backend": "slurm",
                "partition": "gpu,debug",
                "account": "my-project",
                "time": "1-02:03:04",
                "constraint": "h100&ib",
                "env": HOSTILE_ENV,
                "modules": ["cuda/12.4;touch", "x$(touch-owned-8)"],
                "container": {"image": "img$(touch-owned-9)", "mounts": ["/data:/data$(touch-owned-10)"]},
                "python": str(python),
            }
        )
    )
    code, text = main([RECIPES / "quickstart.yaml", f"output_dir={run_dir}", "--nodes", "2", "--cluster", profile])
    assert code == 0, text
    assert (record / "job-exit").read_text() == "0", (run_dir / "slurm.log").read_text()
    escaped = sorted(str(p) for folder in (tmp_path, Path.cwd(), run_dir) for p in folder.rglob("owned-*"))
    assert escaped == [], f"a value ran as a command: {escaped}"

    submitted = json.loads((record / "sbatch.json").read_text())
    expected = [
        f"--job-name={run_dir.name}",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--partition=gpu,debug",
        "--account=my-project",
        "--constraint=h100&ib",
        "--time=1-02:03:04",
        f"--output={str(run_dir / 'slurm.log').replace('%', '%%')}",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@120",
    ]
    assert submitted["directives"] == expected
    assert submitted["log"] == str(run_dir / "slurm.log"), "the log lands in the run directory, under its own name"
    log = (run_dir / "slurm.log").read_text()
    assert "[launch] job 4242 (restart 0) on n[1-2]" in log, log
    assert submitted["argv"][-1] == str(run_dir / "job.sbatch")

    [module_load, second] = records(record, "module")
    assert module_load["argv"] == ["load", "cuda/12.4;touch"] and second["argv"] == ["load", "x$(touch-owned-8)"]
    [srun] = records(record, "srun")
    spec = run_dir / "launch"
    assert srun["argv"][-8:] == [
        "--container-image=img$(touch-owned-9)",
        "--container-mounts=/data:/data$(touch-owned-10)",
        str(python),
        "-m",
        "launcher.cli",
        str(spec / "recipe.yaml"),
        "--cluster",
        str(spec / "cluster.yaml"),
    ]
    assert srun["env"] == HOSTILE_ENV, "every exported value arrives as written"
    assert (spec / "jobs").read_text() == "4242\n"


def test_cancel_passes_only_a_job_id_to_scancel(slurm_stubs, tmp_path):
    """`launch cancel RUN_DIR` reads the newest job id from OUTPUT_DIR/launch/jobs: anything else there (an
    option such as --me, which would cancel every job of the user) is refused before scancel runs."""
    record = slurm_stubs
    spec = tmp_path / "run" / "launch"
    spec.mkdir(parents=True)
    (spec / "cluster.yaml").write_text("backend: slurm\n")
    for token in ("--me", "4242;touch", "-u"):
        (spec / "jobs").write_text(f"4241\n{token}\n")
        code, text = main(["cancel", spec.parent])
        assert code == 2 and "is not a Slurm job id" in text and repr(token) in text, text
        assert "Traceback" not in text
    assert records(record, "scancel") == []
    (spec / "jobs").write_text("4241\n4242_7\n")
    code, text = main(["cancel", spec.parent, "--checkpoint"])
    assert code == 0, text
    assert [r["argv"] for r in records(record, "scancel")] == [["--signal=USR1", "4242_7"]]
