"""Baseline for time to first step with a prepared cache: the least a torchrun script does to train one step
on data someone tokenized ahead: import, join the process group, memory-map the same arrow files launch's
ranks open, load the model + DDP, pad one batch of rows from them, one AdamW step. Times from BENCH_T0.
Run: BENCH_T0=$(date +%s.%N) python -m torch.distributed.run --nproc-per-node N \
       -m bench.baselines.torchrun_cache MODEL ENTRY_FOLDER BATCH RESULT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

t_main = time.time()

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main(model_path: str, entry: str, batch: str, result_path: str) -> None:
    t0 = float(os.environ["BENCH_T0"])
    t_imports = time.time()
    dist.init_process_group("gloo")
    t_pg = time.time()
    files = json.load(open(os.path.join(entry, "manifest.json")))["files"]
    tables = [pa.ipc.open_stream(pa.memory_map(os.path.join(entry, name))).read_all() for name in files]
    table = pa.concat_tables(tables)
    t_data = time.time()
    model = torch.nn.parallel.DistributedDataParallel(AutoModelForCausalLM.from_pretrained(model_path))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t_model = time.time()
    rows = table.take(list(range(dist.get_rank(), int(batch) * 2, 2))).to_pylist()
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([r["attention_mask"] + [0] * (width - len(r["attention_mask"])) for r in rows])
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
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
