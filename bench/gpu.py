"""GPU throughput and MFU: a ~1.1B-parameter Llama built from a config (TinyLlama's shape), bf16 mixed
precision, fixed-length rows of 2048 tokens, full fine-tune and LoRA, trained through `launch` and through
transformers' Trainer with the same settings. One prepared script, ≤ 8 minutes on one H200.

Reports tokens/s per GPU, MFU and peak memory against the planner's estimate.
MFU (PaLM appendix B / torchtitan convention): tokens/s × (6·N + 12·L·H·Q·T) / peak, N = parameters minus
the input embedding, L layers, H heads, Q head dim, T sequence length. LoRA runs use the same formula (the
convention; LoRA skips the frozen weights' gradient matmuls, so its real work is about 2/3 of that). MFU is
given against the datasheet bf16 dense peak (launcher/planning/flops.py, --peak-tflops overrides) and against a bf16
matmul peak measured here first (8192³ GEMMs).

A third run, QLoRA under FSDP2 (issue 17), goes through `launch` only: the 4-bit nf4 base (bf16 compute, stored
in the shards' dtype) sharded by fsdp over every local GPU, LoRA on all linear layers; then the exported adapter
is reloaded with peft onto the base and checked against the norms the ranks trained (the adapter-norm check of
tests/integration/test_lora.py), and its peak memory is set against the planner's estimate.

Settings, identical on both sides: sdpa attention (transformers' default), torch AdamW (foreach, not fused,
because launch's optimizer is torch.optim.AdamW with defaults; Trainer gets optim="adamw_torch"), fp32
master weights with bf16 autocast, no activation checkpointing, no torch.compile; on a GPU, launch's full
fine-tune runs a second time with train.compile (regional compilation), compared with its own eager run.
launch runs its default chunked causal-LM loss (train.lm_loss auto); its summary's MFU is reported too.
Each run's window is first to last optimizer step; launch also writes a checkpoint and the final model after
that window.

    python -m bench.gpu                # needs CUDA
    python -m bench.gpu --smoke        # tiny model on CPU (or GPU): checks the script end to end
"""

from __future__ import annotations

import json
import shutil
import sys
import time

from bench.common import (
    LlamaSize,
    arguments,
    bench_env,
    causal_lm_recipe,
    fixed_length_lm_data,
    launch_cmd,
    print_table,
    ratio,
    run,
    save_llama,
    save_result,
    sizes,
    torchrun_cmd,
    work_dir,
)
from bench.memory import plan_for, planner_estimate, reference_model_states
from launcher.planning.flops import peak_flops

TINYLLAMA = LlamaSize(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000 - 4)
TINY = LlamaSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vocab=200)
TINY_4BIT = LlamaSize(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=200)  # CPU 4-bit: 64 wide
FULL = {"seq_len": 2048, "batch": 8, "steps": 30}
SMOKE = {"seq_len": 32, "batch": 2, "steps": 2}
LORA = {"r": 16, "alpha": 32}


def measured_matmul_peak(cuda: bool) -> float:
    """FLOP/s of large bf16 GEMMs on this device (fp32 and small on CPU, for the smoke run)."""
    import torch

    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (256, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    reps = 50 if cuda else 5
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def flops_per_token(size: LlamaSize, seq_len: int) -> float:
    embedding = (size.vocab + 4) * size.hidden
    head_dim = size.hidden // size.heads
    return 6 * (size.num_params() - embedding) + 12 * size.layers * size.heads * head_dim * seq_len


def adapter_check(run_dir, cuda: bool) -> dict:
    """Reload the exported adapter with peft onto the base; each saved tensor's norm against the norm the ranks
    trained (summary.json adapter_norms); a forward of the reloaded model."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    summary = json.loads((run_dir / "summary.json").read_text())
    saved = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    worst = 0.0
    for name, norm in summary["adapter_norms"].items():
        tensor = saved[name.replace(".default", "")]
        worst = max(worst, abs(tensor.float().norm().item() - norm) / max(norm, 1e-12))
    base_path = json.loads((run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, str(run_dir / "final")).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(4, 36, device=device)[None]).logits
    trained = [n for n in summary["adapter_norms"] if "lora_B" in n]
    return {
        "adapter_tensors": len(summary["adapter_norms"]),
        "max_relative_norm_error": worst,
        "lora_B_trained": bool(trained) and all(summary["adapter_norms"][n] > 0 for n in trained),
        "reloaded_logits_finite": bool(torch.isfinite(logits).all()),
    }


def qlora_fsdp(work, smoke: bool, size: dict, precision: str, env: dict, cuda: bool) -> tuple[list, dict, str]:
    """QLoRA under FSDP2 through launch on every local GPU: (table row, raw results, a note)."""
    import torch

    model_size = TINY_4BIT if smoke else TINYLLAMA
    with torch.device("cuda" if cuda else "cpu"):
        model = save_llama(work / f"llama-{model_size.hidden}x{model_size.layers}", model_size, size["seq_len"])
    data = fixed_length_lm_data(work, size["steps"] * size["batch"], size["seq_len"], model_size.vocab)
    procs = torch.cuda.device_count() if cuda else 1
    out_dir = work / "out-qlora-fsdp"
    recipe = causal_lm_recipe(
        work / "qlora-fsdp.yaml",
        model=model,
        train=data,
        output_dir=out_dir,
        seq_len=size["seq_len"],
        batch_size=size["batch"],
        max_steps=size["steps"],
        precision=precision,
        strategy="fsdp",
        extra={
            "model.lora": {**LORA, "dropout": 0.0, "target_modules": "all-linear"},
            "model.quantization": {"bits": 4, "compute_dtype": "bf16" if cuda else "fp32"},
        },
    )
    parsed, plan = plan_for(recipe, procs)
    if parsed is None:
        return [], {"refused": plan}, f"qlora-fsdp: refused by the plan: {plan}"
    estimate = planner_estimate(parsed, plan)
    shutil.rmtree(out_dir, ignore_errors=True)
    wall = run(launch_cmd(recipe, "--procs", str(procs)), env, 600)
    summary = json.loads((out_dir / "summary.json").read_text())
    check = adapter_check(out_dir, cuda)
    tokens = summary["timings"]["samples_per_s"] * size["seq_len"] / procs
    peak = summary["memory"]["peak_bytes_per_rank"][0]
    per_token = flops_per_token(model_size, size["seq_len"])
    row = [f"launch, QLoRA fsdp ×{procs}", tokens, None, None, peak / 2**30,
           None if estimate is None else estimate / 2**30, ratio(peak, estimate), None, wall]  # fmt: skip
    note = (
        f"qlora-fsdp ({model_size.num_params() / 1e9:.2f}B, 4-bit nf4, {procs} rank(s)): loss "
        f"{summary['train_loss']['first']:.3f} → {summary['train_loss']['last']:.3f}; adapter reloaded with peft: "
        f"{check['adapter_tensors']} tensors, max |saved norm − trained norm| / norm = "
        f"{check['max_relative_norm_error']:.1e}, lora_B trained: {check['lora_B_trained']}, reloaded logits finite: "
        f"{check['reloaded_logits_finite']}; {per_token / 1e9:.2f} GFLOP per token by the dense formula"
    )
    raw = {"summary_timings": summary["timings"], "peak_memory_bytes": peak, "planner_estimate_bytes": estimate,
           "adapter_check": check, "train_loss": summary["train_loss"], "command_wall_s": wall}  # fmt: skip
    return [row], raw, note


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__.splitlines()[0], **FULL)
    parser.add_argument("--peak-tflops", type=float, default=None, help="datasheet bf16 dense peak to use")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench.gpu needs a CUDA device (use --smoke to check it on CPU)", file=sys.stderr)
        return 2
    size = sizes(args, FULL, SMOKE)
    model_size = TINY if args.smoke else TINYLLAMA
    work = work_dir(args, "gpu")
    t_start = time.time()
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak_sheet = peak_flops(device_name if cuda else None, args.peak_tflops)  # the launcher's table
    peak_measured = measured_matmul_peak(cuda)
    with torch.device("cuda" if cuda else "cpu"):
        model = save_llama(work / f"llama-{model_size.hidden}x{model_size.layers}", model_size, size["seq_len"])
    data = fixed_length_lm_data(work, size["steps"] * size["batch"], size["seq_len"], model_size.vocab)
    precision = "bf16" if cuda else "fp32"
    env = bench_env(None if cuda else 1)
    per_token = flops_per_token(model_size, size["seq_len"])
    num_params = model_size.num_params()

    rows, raw, notes = [], {}, []
    for mode in ("full", "lora"):
        extra = {"model.lora": {**LORA, "dropout": 0.0, "target_modules": "all-linear"}} if mode == "lora" else {}
        out_dir = work / f"out-{mode}"
        recipe = causal_lm_recipe(
            work / f"{mode}.yaml",
            model=model,
            train=data,
            output_dir=out_dir,
            seq_len=size["seq_len"],
            batch_size=size["batch"],
            max_steps=size["steps"],
            precision=precision,
            extra=extra,
        )
        parsed, plan = plan_for(recipe, 1)
        estimate = planner_estimate(parsed, plan) if parsed is not None else None
        results = {}
        if parsed is None:
            notes.append(f"launch {mode}: refused by the plan on this branch: {plan}")
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            wall = run(launch_cmd(recipe, "--procs", "1"), env, 600)
            summary = json.loads((out_dir / "summary.json").read_text())
            results["launch"] = {
                **summary["timings"],
                "peak_memory_bytes": summary["memory"]["peak_bytes_per_rank"][0],
                "command_wall_s": wall,
                "launch_mfu": summary["throughput"]["mfu"],  # launch's own accounting (planning/flops.py)
            }
            if cuda and mode == "full":  # the same run with regional torch.compile (train.compile)
                compiled = causal_lm_recipe(
                    work / "full-compile.yaml", model=model, train=data, output_dir=out_dir, seq_len=size["seq_len"],
                    batch_size=size["batch"], max_steps=size["steps"], precision=precision,
                    extra={"train.compile": True},
                )  # fmt: skip
                shutil.rmtree(out_dir, ignore_errors=True)
                wall = run(launch_cmd(compiled, "--procs", "1"), env, 600)
                summary = json.loads((out_dir / "summary.json").read_text())
                results["launch + compile"] = {
                    **summary["timings"],
                    "peak_memory_bytes": summary["memory"]["peak_bytes_per_rank"][0],
                    "command_wall_s": wall,
                    "launch_mfu": summary["throughput"]["mfu"],
                }
        result_file = work / f"trainer-{mode}.json"
        trainer_args = [recipe, result_file] + ([f"{LORA['r']},{LORA['alpha']}"] if mode == "lora" else [])
        wall = run(torchrun_cmd(1, "bench.baselines.hf_trainer", *trainer_args), env, 600)
        results["HF Trainer"] = {**json.loads(result_file.read_text()), "command_wall_s": wall}
        for trainer, r in results.items():
            tokens = r["samples_per_s"] * size["seq_len"]
            formula = reference_model_states(num_params, "ddp", 1) if mode == "full" else None
            rows.append(
                [
                    f"{trainer}, {mode}",
                    tokens,
                    ratio(tokens * per_token, peak_sheet),
                    ratio(tokens * per_token, peak_measured),
                    r["peak_memory_bytes"] / 2**30,
                    None if estimate is None else estimate / 2**30,
                    ratio(r["peak_memory_bytes"], estimate),
                    None if formula is None else formula / 2**30,
                    r["command_wall_s"],
                ]
            )
        if "launch" in results:
            notes.append(
                f"{mode}: launch ÷ Trainer tokens/s = "
                f"{results['launch']['samples_per_s'] / results['HF Trainer']['samples_per_s']:.3f}"
            )
        raw[mode] = {"results": results, "planner_estimate_bytes": estimate}
    qlora_rows, raw["qlora-fsdp"], qlora_note = qlora_fsdp(work, args.smoke, size, precision, env, cuda)
    rows += qlora_rows
    notes.append(qlora_note)

    print_table(
        f"GPU: {num_params / 1e9:.2f}B Llama, seq {size['seq_len']}, batch {size['batch']}, "
        f"{size['steps']} steps, "
        f"{precision}, on {device_name}",
        [
            "run",
            "tokens/s/GPU",
            "MFU (datasheet)",
            "MFU (measured matmul)",
            "peak GiB",
            "planner GiB",
            "peak ÷ planner",
            "model states GiB (16 B/param)",
            "command s",
        ],
        rows,
        [
            f"datasheet peak {None if peak_sheet is None else peak_sheet / 1e12} TFLOP/s; measured matmul peak "
            f"{peak_measured / 1e12:.1f} TFLOP/s; {per_token / 1e9:.2f} GFLOP per token; "
            f"script wall {time.time() - t_start:.0f} s",
            *notes,
        ],
    )
    save_result(
        work,
        {
            "device": device_name,
            "size": size,
            "model": model_size.__dict__,
            "num_params": num_params,
            "flops_per_token": per_token,
            "peak_datasheet": peak_sheet,
            "peak_measured": peak_measured,
            "runs": raw,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
