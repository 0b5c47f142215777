"""`launch export RUN_DIR [--merge] [--out DIR]`: the finished run's model as full Hugging Face weights.

A run's `final/` already holds full weights, consolidated from every rank under
zero3/fsdp. A LoRA run's `final/` holds the adapter (and the trained task head);
`--merge` loads the base model in the recipe's dtype (never quantized: a
4-bit base merges into full-precision weights), applies the adapter, folds it
in, and writes a plain model that loads without peft.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.errors import UsageError

ADAPTER_FILE = "adapter_config.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", type=Path, help="the recipe's output_dir of a finished run")
    p.add_argument("--merge", action="store_true", help="fold a LoRA adapter into the base weights")
    p.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/merged)")
    return p


def merge(run_dir: Path, out: Path) -> Path:
    """Base + adapter → merged full weights in `out`, written atomically."""
    from peft import PeftModel

    from launcher.spec import SPEC_DIR, read_spec
    from launcher.train.checkpoint import export
    from launcher.train.model import build, load_tokenizer

    recipe, _, _ = read_spec(run_dir / SPEC_DIR)
    base_recipe = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"lora": None, "quantization": None})}
    )
    tokenizer = load_tokenizer(recipe)
    base = build(base_recipe, tokenizer)
    merged = PeftModel.from_pretrained(base, str(run_dir / "final")).merge_and_unload()
    export(merged, tokenizer, out)
    return out


def main(argv: list[str]) -> int:
    """0 when done; a run that has not finished is a UsageError (exit 2)."""
    args = parser().parse_args(argv)
    final = args.run_dir / "final"
    if not final.is_dir():
        raise UsageError.one(
            "RUN_DIR", f"{final} does not exist; the run has not finished (launch the recipe again to resume it)"
        )
    if not (final / ADAPTER_FILE).exists():
        note = " (nothing to merge: not a LoRA run)" if args.merge else ""
        print(f"{final.resolve()} holds the full weights{note}")
        return 0
    if not args.merge:
        print(f"{final.resolve()} holds the LoRA adapter; add --merge to write full weights")
        return 0
    out = merge(args.run_dir, args.out or args.run_dir / "merged")
    print(f"merged weights: {out.resolve()}")
    return 0
