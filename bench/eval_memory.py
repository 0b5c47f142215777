"""Evaluation memory: what one rank holds and gathers for a split's metrics, accumulated per batch
(launcher.train.metrics.EvalOutputs: counts, running sums, ROC-AUC's float32 scores) against the previous way
in the same run: every batch's probabilities and labels kept whole, gathered, concatenated and scored once.

Synthetic softmax outputs, seeded; batches of 64; one rank's share (the other ranks hold the same amount);
the metrics of both ways are compared for equality. Bytes gathered = the pickled payload a rank hands to
`gather_object`; peak = tracemalloc's peak of the whole evaluation (folding in, gathering, scoring).

    python -m bench.eval_memory            # 1,000,000 rows of 2 classes and of 20 (token tags)
    python -m bench.eval_memory --smoke    # 10,000 rows
"""

from __future__ import annotations

import pickle
import time
import tracemalloc

import numpy as np

from bench.common import arguments, print_table, save_result, sizes, work_dir
from launcher.train.metrics import EvalOutputs, compute, keeps_scores

FULL = {"rows": 1_000_000}
SMOKE = {"rows": 10_000}
BATCH = 64
CASES = [  # (label, task, classes, metrics)
    ("2 classes, accuracy + f1", "sequence_classification", 2, ["accuracy", "f1"]),
    ("2 classes, + roc_auc", "sequence_classification", 2, ["accuracy", "f1", "roc_auc"]),
    ("20 tags, accuracy + f1 + per_class", "token_classification", 20, ["accuracy", "f1", "per_class"]),
]


def batches(rows: int, classes: int):
    rng = np.random.default_rng(0)
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        logits = rng.normal(size=(n, classes)).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        yield probs, rng.integers(0, classes, n)


def accumulated(task, rows, classes, names):
    out = EvalOutputs(task, keep_scores=keeps_scores(names))
    for probs, labels in batches(rows, classes):
        out.add((probs, labels))
    payload = pickle.dumps(out)  # what gather_object sends
    merged = pickle.loads(payload)
    return compute(merged, names), len(payload)


def whole(task, rows, classes, names):
    """The previous evaluator: keep every batch's arrays, gather them, concatenate, score."""
    probs, labels = [], []
    for p, y in batches(rows, classes):
        probs.append(p)
        labels.append(y)
    payload = pickle.dumps((probs, labels))
    probs, labels = pickle.loads(payload)
    out = EvalOutputs(task, probs=np.concatenate(probs), labels=np.concatenate(labels))
    return compute(out, names), len(payload)


def measure(fn, *args):
    tracemalloc.start()
    start = time.perf_counter()
    metrics, gathered = fn(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return metrics, gathered, peak, seconds


def main() -> None:
    args = arguments(__doc__.splitlines()[0], **FULL).parse_args()
    size = sizes(args, FULL, SMOKE)
    rows, results = size["rows"], []
    table = []
    for label, task, classes, names in CASES:
        accumulated(task, 1000, classes, names)  # warm up both: first calls allocate numpy's own caches
        whole(task, 1000, classes, names)
        new = measure(accumulated, task, rows, classes, names)
        old = measure(whole, task, rows, classes, names)
        same = new[0] == old[0] or all(
            abs(new[0][k] - old[0][k]) <= 1e-9 for k in new[0] if isinstance(new[0][k], float)
        )
        mib = 2**20
        table.append(
            [label, new[1] / mib, old[1] / mib, old[1] / max(new[1], 1), new[2] / mib, old[2] / mib, new[3], old[3],
             "yes" if same else "NO"]
        )  # fmt: skip
        results.append(
            {
                "case": label,
                "gathered_bytes": [new[1], old[1]],
                "peak_bytes": [new[2], old[2]],
                "seconds": [new[3], old[3]],
                "same_metrics": same,
            }
        )
    print_table(
        f"evaluation memory per rank, {rows:,} rows in batches of {BATCH}: accumulated vs kept whole",
        ["case", "gathered MiB", "whole: MiB", "whole ÷ accumulated", "peak MiB", "whole: peak MiB", "s",
         "whole: s", "same metrics"],
        table,
    )  # fmt: skip
    save_result(work_dir(args, "eval_memory"), {"rows": rows, "batch": BATCH, "cases": results})


if __name__ == "__main__":
    main()
