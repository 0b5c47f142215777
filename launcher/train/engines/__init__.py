"""How the ranks hold and update the model: DDP, DeepSpeed ZeRO-1/2/3, or torch FSDP2.

The loop in run.py talks to one small interface (`Engine`): prepare the model
and optimizer, run a micro-batch's backward, step, save and load the sharded
states, and gather full weights for the export. Each strategy is driven
directly by its own library, so CPU tests exercise the code that runs on GPUs:

- ddp (ddp.py): Accelerate.
- zero1/2/3 (deepspeed.py): `deepspeed.initialize` with the recipe's AdamW.
- fsdp (fsdp.py): torch's `fully_shard` (FSDP2).

Sharded checkpoints: DeepSpeed's own (`save_checkpoint`) and torch.distributed.
checkpoint for FSDP2, written beside Accelerate's RNG and scheduler states in
the same atomic checkpoint folder.
"""

from __future__ import annotations

from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan
from launcher.train.engines.base import Engine
from launcher.train.engines.ddp import DDPEngine
from launcher.train.engines.deepspeed import DeepSpeedEngine
from launcher.train.engines.fsdp import FSDPEngine

# planned strategy → its engine; total over what the planner can plan (tests/unit/test_registries.py)
ENGINES: dict[str, type[Engine]] = {
    "ddp": DDPEngine,
    "zero1": DeepSpeedEngine,
    "zero2": DeepSpeedEngine,
    "zero3": DeepSpeedEngine,
    "fsdp": FSDPEngine,
}


def make_engine(accelerator, recipe: Recipe, plan: Plan) -> Engine:
    """Made before the model is loaded: ZeRO-3 changes how from_pretrained loads."""
    return ENGINES[plan.strategy](accelerator, recipe, plan)
