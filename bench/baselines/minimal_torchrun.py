"""Baseline for start-up: the least a torchrun script does before its first optimizer step.

Import torch and transformers, join the process group, load the model, take one AdamW step on a fixed
batch. Times are measured from BENCH_T0 (set just before torchrun was started) like launch's from its start.
With ENTRY (a folder of launch's tokenized cache), the batch is instead 2 rows per rank of that entry's arrow
files, memory-mapped as launch's ranks open them (bench.data: time to first step on a prepared cache).
Run: BENCH_T0=$(date +%s.%N) python -m torch.distributed.run --nproc-per-node N \
       -m bench.baselines.minimal_torchrun MODEL SEQ RESULT.json [ENTRY]
"""

from __future__ import annotations

import json
import os
import sys
import time

t_main = time.time()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def cached_batch(entry: str, rank: int) -> dict[str, torch.Tensor]:
    """2 rows of the entry per rank, padded (ids 0, labels -100, mask 0)."""
    import pyarrow as pa

    files = json.load(open(os.path.join(entry, "manifest.json")))["files"]
    table = pa.concat_tables([pa.ipc.open_stream(pa.memory_map(os.path.join(entry, f))).read_all() for f in files])
    rows = table.take([2 * rank, 2 * rank + 1]).to_pylist()
    width = max(len(r["input_ids"]) for r in rows)
    pads = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    return {k: torch.tensor([r[k] + [fill] * (width - len(r[k])) for r in rows]) for k, fill in pads.items()}


def main(model_path: str, seq_len: str, result_path: str, entry: str | None = None) -> None:
    t0 = float(os.environ["BENCH_T0"])
    t_imports = time.time()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    t_pg = time.time()
    batch = cached_batch(entry, dist.get_rank()) if entry else None
    t_data = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device)
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t_model = time.time()
    if batch is None:
        ids = torch.randint(4, model.module.config.vocab_size, (2, int(seq_len)), device=device)
        batch = {"input_ids": ids, "labels": ids}
    model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
    optimizer.step()
    t_step = time.time()
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(
                {
                    "rank_start_s": t_main - t0,
                    "imports_s": t_imports - t_main,
                    "process_group_s": t_pg - t_imports,
                    "data_prep_s": t_data - t_pg,
                    "model_load_s": t_model - t_data,
                    "first_step_s": t_step - t_model,
                    "time_to_first_step_s": t_step - t0,
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
