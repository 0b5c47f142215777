"""What every benchmark shares: synthetic data and models built from configs, running `launch` and
torchrun as real subprocesses, the machine description, and the rich table each benchmark prints.

Everything is generated locally and seeded, so a benchmark needs no network and gives the same
inputs on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "runs" / "bench"

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def arguments(description: str, **defaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark runs (CI), measures nothing")
    p.add_argument("--out", type=Path, default=None, help="work folder (default runs/bench/NAME)")
    for name, value in defaults.items():
        p.add_argument(
            f"--{name.replace('_', '-')}", type=type(value), default=None, help=f"default {value} (smoke: smaller)"
        )
    return p


def sizes(args: argparse.Namespace, full: dict, smoke: dict) -> dict:
    """The benchmark's sizes: full or smoke, then whatever was given on the command line."""
    return {**(smoke if args.smoke else full), **{k: v for k, v in vars(args).items() if k in full and v is not None}}


def work_dir(args: argparse.Namespace, name: str) -> Path:
    return args.out or OUT / (f"{name}-smoke" if args.smoke else name)


def machine() -> dict:
    """What RESULTS.md needs to make a figure reproducible, and how loaded the machine was."""
    import torch

    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(title: str, columns: list[str], rows: list[list], notes: list[str] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    console = Console(width=max(160, Console().width))
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def save_result(work: Path, payload: dict) -> Path:
    """Raw numbers next to the table (work/result.json), for RESULTS.md and for re-checking a ratio."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "result.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


# --- synthetic data and models -------------------------------------------------------------------


def words(num: int) -> list[str]:
    return [f"w{i}" for i in range(num)]


def texts(num_rows: int, min_words: int, max_words: int, vocab: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocab, k=rng.randint(min_words, max_words))) for _ in range(num_rows)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def word_tokenizer(vocab: list[str]):
    """A whitespace word-level tokenizer over `vocab`: one word, one token, so row lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {tok: i for i, tok in enumerate(SPECIAL + vocab)}
    core = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def num_params(self) -> int:
        import torch
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(self.config(8)).parameters())

    def config(self, max_positions: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(SPECIAL) + self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=max_positions,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=False,
        )


def save_llama(folder: Path, size: LlamaSize, max_positions: int, dtype: str = "fp32") -> Path:
    """A randomly initialised Llama-architecture model and its word tokenizer, saved like a hub folder."""
    import torch
    from transformers import LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    model = LlamaForCausalLM(size.config(max_positions)).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model.save_pretrained(folder)
    word_tokenizer(words(size.vocab)).save_pretrained(folder)
    return folder


def llama_folder(work: Path, size: LlamaSize, max_positions: int) -> Path:
    return save_llama(work / f"llama-{size.hidden}x{size.layers}", size, max_positions)


def ranks(cpu_procs: int) -> tuple[int, int]:
    """(ranks to start, GPUs): one rank per visible GPU, else `cpu_procs` CPU ranks."""
    import torch

    gpus = torch.cuda.device_count()
    return gpus or cpu_procs, gpus


def fixed_length_lm_data(folder: Path, num_rows: int, seq_len: int, vocab_size: int) -> Path:
    """Texts of seq_len+8 words, so every row is exactly seq_len tokens after truncation (no padding)."""
    path = folder / f"lm-{num_rows}x{seq_len}.jsonl"
    if not path.exists():
        write_jsonl(path, [{"text": t} for t in texts(num_rows, seq_len + 8, seq_len + 8, words(vocab_size))])
    return path


def causal_lm_recipe(
    path: Path,
    *,
    model: Path,
    train: Path,
    output_dir: Path,
    seq_len: int,
    batch_size: int,
    max_steps: int,
    precision: str = "fp32",
    strategy: str = "ddp",
    extra: dict | None = None,
) -> Path:
    """The recipe every launch-side benchmark trains; the baselines read the same numbers from it."""
    recipe = {
        "model": {"path": str(model)},
        "task": {"type": "causal_lm"},
        "data": {"train": str(train), "max_length": seq_len, "split": {"validation": 0.0, "test": 0.0}},
        "train": {
            "batch_size": batch_size,
            "max_steps": max_steps,
            "precision": precision,
            "eval_every": None,
            "log_every": 10,
            "resume": "never",
            "grad_clip": 1.0,
            "optimizer": {"lr": 1e-4, "weight_decay": 0.01},
            "scheduler": {"name": "linear", "warmup_steps": 2},
        },
        "distributed": {"strategy": strategy},
        "output_dir": str(output_dir),
    }
    for dotted, value in (extra or {}).items():
        node = recipe
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --- processes -----------------------------------------------------------------------------------


def bench_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """Same environment for launch and the baselines: threads per rank fixed, offline, this checkout first."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


class BenchFailed(RuntimeError):
    pass


def run(cmd: list[str], env: dict, timeout: float, cwd: Path = REPO) -> float:
    """Run a command to completion; its wall time. A failure raises with the tail of its output."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BenchFailed(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")
    return wall


def launch_cmd(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", str(recipe), *args]


def torchrun_cmd(procs: int, module: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(procs),
        "-m",
        module,
        *map(str, args),
    ]


def threads_per_rank(procs: int) -> int:
    return max(1, (os.cpu_count() or 1) // procs)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
