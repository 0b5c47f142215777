"""zero1/2/3: DeepSpeed ZeRO, driven directly with the plan's config and the recipe's AdamW as a client optimizer.

Accelerate's DeepSpeed wrapper would step on every micro-batch unless its own accumulation context is used, and
on CPU it needs a gloo workaround; calling DeepSpeed directly needs neither. Checkpoints are DeepSpeed's own
(`save_checkpoint`), resharded through its universal checkpoint when the world size changed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import shutil
from pathlib import Path

import torch

from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan
from launcher.train.engines.base import Engine


def skip_deepspeed_shm_op() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory allreduce (minutes) at init; plain gloo does the job.
    (`import deepspeed.comm.torch as x` would bind the real torch module: deepspeed.comm re-exports it.)"""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class DeepSpeedEngine(Engine):
    def __init__(self, accelerator, recipe: Recipe, plan: Plan):
        super().__init__(accelerator, recipe, plan)
        self.config = plan.deepspeed_config
        self.stage = self.config["zero_optimization"]["stage"]
        self.sharded = "parameters" if self.stage == 3 else "optimizer states"
        if self.stage == 3:
            # ZeRO-3 casts every floating parameter to its own dtype: a 4-bit base stored in float32 under bf16
            # would be cast and broken (measured: "shape '[64, 32]' is invalid for input of size 1024")
            enabled = [dtype for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                       if self.config.get(key, {}).get("enabled")]  # fmt: skip
            self.quant_storage = enabled[0] if enabled else torch.float32
        if plan.device == "cpu":
            skip_deepspeed_shm_op()
        import deepspeed

        deepspeed.init_distributed(dist_backend=plan.backend)  # adopts Accelerate's process group
        self._hf_config = None
        if self.stage == 3 and recipe.model.lora is None:
            # from_pretrained then loads each rank's shard only (deepspeed.zero.Init), so a model larger than one
            # GPU can be loaded; transformers holds this object by weak reference, hence the attribute.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(self.config)

    def prepare(self, model, make_optimizer):
        import deepspeed

        self.base_optimizer = make_optimizer(model)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.base_optimizer, config=self.config
        )
        return self.model

    def frozen(self, model):
        """zero3: the reference is built under zero.Init like the trained model (partitioned while loading) and
        run by an engine of its own without an optimizer; zero1/2 shard only optimizer states: a whole copy."""
        if self.stage != 3:
            return super().frozen(model)
        import deepspeed

        model.requires_grad_(False)
        config = {k: v for k, v in self.config.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None
        return engine

    def accumulating(self, sync):
        self.model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss, sync):
        # the loop already scales the loss to the global mean, so DeepSpeed must not divide by accumulation again
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()  # DeepSpeed counts micro-steps; it updates only at the accumulation boundary

    def step(self):
        # clipping happened inside DeepSpeed's step (gradient_clipping in the config)
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None and self.recipe.train.grad_clip is not None else None

    def save(self, folder):
        self.model.save_checkpoint(
            str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=self.recipe.model.lora is not None
        )

    def load(self, folder, saved_world_size):
        if saved_world_size != self.acc.num_processes:
            return self._load_resharded(folder)
        path, _ = self.model.load_checkpoint(
            str(folder / "deepspeed"),
            tag="state",
            load_lr_scheduler_states=False,
            load_module_strict=self.recipe.model.lora is None,
        )
        if path is None:
            raise RuntimeError(f"no DeepSpeed state in {folder}; was it written with another strategy?")

    def _load_resharded(self, folder: Path) -> None:
        """ZeRO partitions depend on the world size, so a checkpoint of another world size is converted to
        DeepSpeed's universal checkpoint (one fp32 file per parameter and per Adam moment) by rank 0, into a
        hidden folder of this run's output_dir (the checkpoint stays as written, and may be someone else's:
        train.resume=PATH), and loaded from there by every rank."""
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        universal = Path(self.recipe.output_dir) / f".universal-{folder.name}"
        if self.acc.is_main_process:
            print(
                f"resharding the ZeRO states of {folder.name} for {self.acc.num_processes} processes through "
                "DeepSpeed's universal checkpoint",
                flush=True,
            )
            shutil.rmtree(universal, ignore_errors=True)
            # inject_missing_state: a plain (non-Megatron) model has no UNIVERSAL_CHECKPOINT_INFO; 1 worker: no
            # process pool. Its progress prints would flood the rank's log.
            with contextlib.redirect_stdout(io.StringIO()):
                ds_to_universal.main(
                    Namespace(
                        input_folder=str(folder / "deepspeed" / "state"),
                        output_folder=str(universal / "state"),
                        num_extract_workers=1,
                        num_merge_workers=1,
                        keep_temp_folder=False,
                        strict=True,
                        inject_missing_state=True,
                    )
                )
        self.acc.wait_for_everyone()
        config = self.model._config
        config.load_universal_checkpoint = True
        try:
            path, _ = self.model.load_checkpoint(
                str(universal),
                tag="state",
                load_lr_scheduler_states=False,
                load_module_strict=self.recipe.model.lora is None,
            )
        finally:
            config.load_universal_checkpoint = False
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(universal, ignore_errors=True)
        if path is None:
            raise RuntimeError(f"no DeepSpeed state in {folder}; was it written with another strategy?")

    def unwrapped(self):
        return self.model.module

    def full_state_dict(self):
        if self.stage == 3:
            return self.model._zero3_consolidated_16bit_state_dict()
        return None

    def _local(self, param):
        return param.ds_tensor.detach() if self.stage == 3 else param.detach()

    def _numel(self, param):
        return param.ds_numel if self.stage == 3 else param.numel()

    def local_tensors(self):
        return [self._local(p) for p in self.model.module.parameters()]

    def held(self):
        if self.stage == 3:
            return (
                sum(p.ds_tensor.numel() for p in self.model.module.parameters()),
                sum(p.ds_numel for p in self.model.module.parameters()),
            )
        # ZeRO-1/2: each rank keeps the fp32 master weights and Adam states of its partition only
        local = sum(t.numel() for t in self.optimizer.single_partition_of_fp32_groups)
        return local, sum(p.numel() for p in self.model.module.parameters() if p.requires_grad)
