"""Checks that need the file system: model folder, data, output and resume paths.

They run in the launcher before any process starts, so that a typo in a path
or a label outside the classes is reported in seconds, not after allocation.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from launcher.config.loading import resolve_model_path
from launcher.config.recipe import Recipe
from launcher.errors import Problem, RecipeError
from launcher.ownership import folder_problems
from launcher.planning.data_files import DataSummary, check_data

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def is_local(path: str) -> bool:
    return Path(path).is_dir()


def looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) <= 2 and all(parts) and not path.startswith((".", "~"))


def check_model(recipe: Recipe) -> list[Problem]:
    try:
        path = resolve_model_path(recipe.model.path)
    except RecipeError as exc:
        return exc.problems
    if not is_local(path):
        if Path(path).exists():
            return [Problem("model.path", f"{path} is a file; give the model folder (with config.json)")]
        if not looks_like_hub_id(path):
            return [Problem("model.path", f"{path} is neither a local folder nor a hub id like 'org/name'")]
        return []  # a hub id: resolved by transformers on the ranks
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        return [Problem("model.path", f"{path} has no config.json; is it a Hugging Face model folder?")]
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [Problem("model.path", f"{config_file} is not valid JSON: {exc}")]
    limit = next((config[k] for k in POSITION_KEYS if isinstance(config.get(k), int)), None)
    if limit is not None and recipe.data.max_length > limit:
        return [
            Problem(
                "data.max_length",
                f"{recipe.data.max_length} is larger than the model's {limit} positions "
                f"({config.get('model_type', 'model')}); use at most {limit}",
            )
        ]
    return []


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def missing_weights(recipe: Recipe) -> list[Problem]:
    """A local model folder with a config but no weights plans fine (the planner reads the config only);
    training it is refused here, before any rank starts loading."""
    path = resolve_model_path(recipe.model.path)
    if not is_local(path) or any(next(Path(path).glob(pattern), None) for pattern in WEIGHT_FILES):
        return []
    return [
        Problem(
            "model.path",
            f"{path} has a config but no weights ({', '.join(WEIGHT_FILES)}); `launch plan` "
            "and --dry-run work without them, training does not: point model.path at the full model folder",
        )
    ]


def check_paths(recipe: Recipe) -> list[Problem]:
    problems = []
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(Problem("output_dir", f"{out} exists and is a file; give a folder"))
    existing = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and existing is not None and not existing.is_dir():
        problems.append(Problem("output_dir", f"{existing} is a file, so {out} cannot be created; give a folder"))
    problems += folder_problems(recipe.output_dir)
    resume = recipe.train.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        problems.append(
            Problem(
                "train.resume", f"checkpoint folder {resume} not found; use 'auto', 'never' or a checkpoint-* folder"
            )
        )
    return problems + mixed_runs(recipe)


def mixed_runs(recipe: Recipe) -> list[Problem]:
    """Starting over (resume: never), or from a checkpoint elsewhere, in an output_dir that holds checkpoints of
    an earlier launch would mix two runs there: retention would count the other run's checkpoints, and the
    next `resume: auto` would pick whichever has the highest step."""
    from launcher.train.checkpoint import complete

    resume, out = recipe.train.resume, Path(recipe.output_dir)
    found = complete(out)
    if resume == "auto" or not found or (resume != "never" and Path(resume).resolve().parent == out.resolve()):
        return []
    start = "starting over" if resume == "never" else f"resuming {resume}"
    return [
        Problem(
            "train.resume",
            f"{start} in {out}, which holds checkpoints of an earlier launch ({found[-1].name}, ...), would mix two "
            f"runs there; use a fresh output_dir, or remove those checkpoints first",
        )
    ]


def ignored_settings(recipe: Recipe, summary: DataSummary | None = None) -> list[str]:
    """Settings that are valid but have no effect for this task (or on these rows): said, not silently dropped."""
    notes = recipe.task.spec.ignored_settings(recipe)
    if summary is not None:
        notes += empty_carved_splits(recipe, summary)
    if recipe.train.max_steps and "epochs" in recipe.train.model_fields_set:
        notes.append("train.epochs is ignored: train.max_steps sets the length of the run")
    dist = recipe.distributed
    if dist.strategy == "auto" and (dist.offload != "none" or dist.offload_parameters):
        notes.append(
            "distributed.offload/offload_parameters are ignored with strategy: auto, which chooses the offload"
        )
    if "checkpoint_async" in recipe.train.model_fields_set and dist.strategy not in ("fsdp", "auto"):
        notes.append(f"train.checkpoint_async is ignored: {dist.strategy} saves synchronously (only fsdp writes in "
                     "the background)")  # fmt: skip
    if recipe.train.eval_every is not None and recipe.data.validation is None and recipe.data.split.validation == 0:
        notes.append("train.eval_every is ignored: there is no validation split")
    data, fields = recipe.data, recipe.data.model_fields_set
    if "shuffle_buffer" in fields and not data.streaming:
        notes.append("data.shuffle_buffer is ignored: it shuffles streamed data (data.streaming: true)")
    if "mix_by" in fields and not data.weighted:
        notes.append("data.mix_by is ignored: no training source has a weight")
    if data.weighted and len(data.train) == 1:
        notes.append("data.train's weight is ignored: there is one training source")
    if recipe.train.tensorboard:
        notes.append("train.tensorboard is deprecated: write train.report_to: [tensorboard] (honoured as that)")
    if recipe.train.max_steps == 0 and (recipe.train.early_stopping or recipe.train.keep_best):
        notes.append("train.early_stopping/keep_best are ignored: train.max_steps=0 evaluates without training")
    return notes


def empty_carved_splits(recipe: Recipe, summary: DataSummary) -> list[str]:
    """A validation or test share of `data.split` that rounds to no row of the training data: evaluation would
    be off (or the test split empty) without a word."""
    notes, counts = [], summary.counts
    total = counts["train"] + sum(counts[s] for s in ("validation", "test") if getattr(recipe.data, s) is None)
    for split in ("validation", "test"):
        ratio = getattr(recipe.data.split, split)
        if getattr(recipe.data, split) is None and ratio > 0 and not counts[split] and total:
            effect = "there is no evaluation (train.eval_every is ignored)" if split == "validation" else "no test"
            notes.append(
                f"data.split.{split} {ratio:g} of {total} rows rounds to 0 rows: {effect}; use at least "
                f"{1 / total:.2g}, or give data.{split} a file"
            )
    return notes


def check_adapter(recipe: Recipe) -> list[Problem]:
    adapter = recipe.model.adapter
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        return [Problem("model.adapter", f"{adapter} has no adapter_config.json; give a LoRA run's final/ folder")]
    return []


def check_training_extras(recipe: Recipe, summary: DataSummary | None) -> list[Problem]:
    """Trackers installed; early_stopping and keep_best watch a number the validation evaluation reports,
    on a validation split that exists."""
    problems = []
    for name in recipe.train.trackers:
        if importlib.util.find_spec(name) is None:  # each tracker's module and pip package share its name
            problems.append(Problem("train.report_to", f"{name} is not installed here; pip install {name}"))
    task = recipe.task
    for field in ("early_stopping", "keep_best"):
        watched = getattr(recipe.train, field)
        if watched is None:
            continue
        from launcher.train.metrics import reported  # numpy only: no torch on the launcher side

        valid = reported(task.type, task.resolved_metrics, task.resolved_num_labels)
        if watched.metric not in valid:
            problems.append(
                Problem(
                    f"train.{field}.metric",
                    f"{watched.metric!r} is not reported by the validation evaluation of {task.type} with metrics "
                    f"{', '.join(task.resolved_metrics)}; valid: {', '.join(valid)}",
                )
            )
        if summary is not None and not summary.counts["validation"]:
            problems.append(
                Problem(f"train.{field}", "needs a validation split: data.validation, or data.split.validation > 0")
            )
    if recipe.train.early_stopping is not None and recipe.train.eval_every is None:
        problems.append(
            Problem("train.early_stopping", "needs evaluations during training: set train.eval_every (N or 'epoch')")
        )
    return problems


def check_recipe(recipe: Recipe) -> DataSummary:
    """Everything checkable before launch; raises one RecipeError with all problems."""
    problems = check_model(recipe) + check_adapter(recipe) + check_paths(recipe) + check_cache_dir(recipe)
    try:
        summary = check_data(recipe)
    except RecipeError as exc:
        problems += exc.problems
        summary = None
    problems += check_training_extras(recipe, summary)
    if problems:
        raise RecipeError("recipe", problems)
    return summary


def check_cache_dir(recipe: Recipe) -> list[Problem]:
    from launcher.planning.data_cache import cache_root

    root = cache_root(recipe)
    existing = next((p for p in [root, *root.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        field = "data.cache_dir" if recipe.data.cache_dir else "LAUNCHER_CACHE_DIR"
        return [Problem(field, f"{existing} is a file, so the tokenized cache {root} cannot be created; give a folder")]
    return []
