"""What a run tells its user: the progress bar, log lines, metrics.jsonl, and the experiment trackers
(train.trackers: TensorBoard, MLflow, W&B).

Only rank 0 writes files and draws the bar; every rank may log, and its lines
say which rank they come from.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from launcher.train.preflight import gbps, gib_or_dash

METRICS_FILE = "metrics.jsonl"


def rank_logger(rank: int) -> logging.Logger:
    logger = logging.getLogger(f"launcher.rank{rank}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class _ConsoleHandler(logging.Handler):
    def __init__(self, console, formatter: logging.Formatter):
        super().__init__()
        self.console = console
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)


def truncate_metrics(run_dir: Path, last_step: int, log: logging.Logger | None = None) -> None:
    """On resume, forget records of steps after the checkpoint: they are trained again. A line that is not a
    JSON record (a kill in the middle of a write tears the last one) is dropped, and said."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            torn.append(number)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    if torn and log is not None:
        log.warning(f"{path}: dropped {len(torn)} line(s) that are not JSON records (line {torn[0]}: torn by a kill?)")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class Reporter:
    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        total_steps: int,
        start_step: int,
        log_every: int,
        logger: logging.Logger,
        trackers=None,
    ):
        self.is_main = is_main
        self.log_every = log_every
        self.total = total_steps
        self.logger = logger
        self.metrics_path = run_dir / METRICS_FILE
        self.trackers = trackers  # train.trackers.Trackers on rank 0, when the recipe reports to any
        self.progress = None
        if not is_main:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]:.1f} samples/s"
                    "{task.fields[tokens]}"
                ),
                TimeRemainingColumn(),
                console=console,
            )
            self.task_id = self.progress.add_task(
                "train", total=total_steps, completed=start_step, loss=float("nan"), lr=0.0, speed=0.0, tokens=""
            )
            self.progress.start()
            # Log lines print above the live bar instead of tearing through it.
            self.plain_handlers = logger.handlers[:]
            logger.handlers = [_ConsoleHandler(console, self.plain_handlers[0].formatter)]

    def _append(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def step(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        samples_per_s: float,
        throughput: dict | None = None,
    ) -> None:
        """`throughput`: the window's token figures (train.throughput), added to the record and the bar."""
        if not self.is_main:
            return
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": samples_per_s,
            **(throughput or {}),
            "time": time.time(),
        }
        self._append(record)
        if self.trackers:
            numbers = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_s}
            numbers.update({k: (throughput or {}).get(k) for k in ("trained_tokens_per_s", "padding_fraction", "mfu")})
            self.trackers.log("train", step, {f"train/{k}": v for k, v in numbers.items() if v is not None})
        tokens = tokens_text(throughput)
        if self.progress:
            self.progress.update(self.task_id, loss=loss, lr=lr, speed=samples_per_s, tokens=tokens)
        if step % self.log_every == 0 or step == self.total:
            self.logger.info(
                f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} {samples_per_s:.1f} samples/s"
                + tokens
            )

    def tick(self, step: int) -> None:
        """Advance the bar every step; the numbers on it refresh at each flush of the step losses."""
        if self.progress:
            self.progress.update(self.task_id, completed=step)

    def evaluation(self, step: int, split: str, metrics: dict) -> None:
        if not self.is_main:
            return
        self._append({"step": step, "split": split, "metrics": metrics, "time": time.time()})
        if self.trackers:
            numbers = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.trackers.log(split, step, numbers)
        flat = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        self.logger.info(f"eval {split} at step {step}: {flat}")

    def close(self, finished: bool = True) -> None:
        """`finished`: the run completed (else it stopped, to resume later: its tracker runs stay open)."""
        if self.progress:
            self.progress.stop()
            self.logger.handlers = self.plain_handlers
        if self.trackers:
            self.trackers.close(finished)


def tokens_text(throughput: dict | None) -> str:
    """The bar's and the log line's token figures: trained tokens/s, padding, MFU where the peak is known."""
    if not throughput:
        return ""
    text = f"  {throughput['trained_tokens_per_s']:.0f} trained tok/s  pad {100 * throughput['padding_fraction']:.0f}%"
    return text + (f"  MFU {100 * throughput['mfu']:.1f}%" if throughput.get("mfu") is not None else "")


class StepLosses:
    """Per-step loss sums stay on the device until a flush, which all-reduces them in one collective (and
    gathers the throughput's window: train.throughput, which counts the tokens).

    No host sync and no collective per step (on a GPU both stall the pipeline), yet
    metrics.jsonl still gets every step's global-batch loss.
    """

    def __init__(self, accelerator, reporter: Reporter, plan, first: float | None, last: float | None, window=None):
        """`window()`: the throughput figures of the steps since the last flush (a collective, called here)."""
        self.acc, self.reporter, self.plan, self.window = accelerator, reporter, plan, window
        self.pending: list[tuple] = []
        self.first, self.last = first, last
        self.window_start = time.time()

    def add(self, step: int, loss_sum: torch.Tensor, weight: float, lr: float, grad_norm) -> None:
        self.pending.append((step, loss_sum, weight, lr, grad_norm))

    def flush(self) -> None:
        if not self.pending:
            return
        sums = self.acc.reduce(torch.stack([p[1] for p in self.pending]).double(), "sum").tolist()
        speed = len(self.pending) * self.plan.global_batch_size / max(time.time() - self.window_start, 1e-9)
        throughput = self.window() if self.window is not None else None
        for (step, _, weight, lr, grad_norm), total in zip(self.pending, sums):
            loss = total / weight
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; lower train.optimizer.lr or check the data")
            self.first = loss if self.first is None else self.first
            self.last = loss
            self.reporter.step(
                step,
                math.ceil(step / self.plan.steps_per_epoch),
                loss,
                lr,
                None if grad_norm is None else float(grad_norm),
                speed,
                throughput,
            )
        self.pending = []
        self.window_start = time.time()


def show_preflight(report: dict) -> None:
    """Rank 0's table: one row per node; then who differs, when versions do."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(
        title=f"pre-flight: {report['world_size']} ranks, all-reduce of {gib_or_dash(report['allreduce']['bytes'])}"
        f" at {gbps(_bps(report['allreduce']['bus_bandwidth_GBps']))} bus bandwidth"
    )
    for column in (
        "node",
        "ranks",
        "versions",
        "bandwidth",
        "shared FS",
        "RAM free / needed",
        "disk free / needed",
        "status",
    ):
        table.add_column(column)
    for row in report["nodes"]:
        table.add_row(
            row["node"],
            ",".join(map(str, row["ranks"])),
            "ok" if row["versions_ok"] else "DIFFER",
            gbps(_bps(row["bus_bandwidth_GBps"])),
            "ok" if row["shared_fs_ok"] else "FAIL",
            f"{gib_or_dash(row['ram_free'])} / {gib_or_dash(row['ram_needed'])}",
            f"{gib_or_dash(row['disk_free'])} / {gib_or_dash(row['disk_needed'])}",
            "ok" if row["ok"] else "[bold red]FAIL[/]",
        )
    console.print(table)
    if report["version_mismatch"]:
        differ = Table(title="versions that differ between ranks")
        columns = list(report["version_mismatch"][0])
        for column in columns:
            differ.add_column(column)
        for group in report["version_mismatch"]:
            differ.add_row(*(",".join(map(str, v)) if isinstance(v, list) else str(v) for v in group.values()))
        console.print(differ)
    if report["note"]:
        console.print(f"pre-flight: {report['note']}")
    elif report["slowest_pair"]:
        console.print(f"pre-flight: slowest node pair {' - '.join(report['slowest_pair'])}")
    for failure in report["failures"]:
        console.print(f"[bold red]pre-flight failed[/]: {failure}", soft_wrap=True)
    console.print(f"pre-flight {report['status']} in {report['seconds']:.2f} s", soft_wrap=True)


def _bps(gbps: float | None) -> float | None:
    return None if gbps is None else gbps * 1e9
