"""`launch eval RECIPE [--model PATH]`: the recipe's validation and test evaluation of a model, training nothing.

The model is the recipe's base (model.path) or any exported folder: full weights (a run's final/, `launch
export --merge`'s merged/) or a LoRA adapter (a LoRA run's final/, loaded onto the base). It is the same
launch as training, with train.max_steps=0, so it runs through every backend with the same flags (--procs,
--nodes, --cluster, --dry-run, --submit, --follow): the ranks set up, evaluate and write
OUTPUT_DIR/eval/NAME/summary.json and metrics.jsonl like a training run (NAME: 'base' or the folder's name).
"""

from __future__ import annotations

from pathlib import Path

from launcher.errors import UsageError


def overrides_for(model: Path | None, output_dir: str) -> list[str]:
    """The recipe overrides that make a launch evaluate `model` (None: the base) into its own folder."""
    extra = ["train.max_steps=0", "train.resume=never", "model.lora=null"]
    name = "base"
    if model is not None:
        folder = model.resolve()
        if (folder / "adapter_config.json").is_file():
            extra.append(f"model.adapter={folder}")
        elif (folder / "config.json").is_file():
            extra.append(f"model.path={folder}")
        else:
            raise UsageError.one(
                "--model",
                f"{model} is neither a model folder (config.json) nor a LoRA adapter (adapter_config.json); "
                "give a run's final/ or merged/ folder",
            )
        name = folder.name
    return [*extra, f"output_dir={Path(output_dir) / 'eval' / name}"]


def main(argv: list[str]) -> int:
    """Exit statuses as `launch RECIPE` (cli.main prints the errors)."""
    from launcher.cli import LaunchRequest, launch_recipe, parser
    from launcher.config.loading import load_recipe

    p = parser()
    p.prog, p.description, p.epilog = "launch eval", __doc__.split("\n\n")[0], None
    p.add_argument("--model", type=Path, default=None, metavar="PATH", help="exported model or adapter folder")
    args = p.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    request = LaunchRequest.from_args(args)
    request.overrides = [*args.overrides, *overrides_for(args.model, recipe.output_dir)]
    return int(launch_recipe(request))
