"""Where a rank's time went: named marks taken as the run passes them, turned into summary.json's timings.

The time to first step is split at the launcher's own marks (launch start, plan done: the spec's launch
facts) and the rank's (process group, pre-flight, data, model, first step), so a slow start names its part.
"""

from __future__ import annotations

import time

from launcher.records import Timings
from launcher.spec import LaunchFacts


class Clock:
    def __init__(self, facts: LaunchFacts):
        self.facts = facts
        self.marks: dict[str, float] = {"rank_start": time.time()}
        self.cpu: dict[str, float] = {}
        self.saves: list[float] = []  # seconds each checkpoint save held the loop

    def mark(self, name: str) -> None:
        """Note that the run reached `name` now (the first time only: a mark is a moment, not a duration)."""
        self.marks.setdefault(name, time.time())

    def mark_cpu(self, name: str) -> None:
        self.cpu.setdefault(name, time.process_time())

    def timings(self, steps_run: int, global_batch_size: int) -> Timings:
        m, facts = self.marks, self.facts
        first_step = m.get("first_step")
        train_wall = m["train_end"] - m["train_start"]
        preflight = m["preflight_end"] - m["preflight_start"]
        return Timings(
            time_to_first_step_s=(first_step - facts.started_at) if first_step else None,
            recipe_and_plan_s=facts.planned_at - facts.started_at,
            rank_start_s=m["rank_start"] - facts.planned_at,
            process_group_s=m["process_group"] - m["rank_start"],
            preflight_s=preflight,
            data_prep_s=m["data"] - m["process_group"] - preflight,  # library set-up, tokenizer, data
            model_load_s=m["model"] - m["data"],
            first_step_s=(first_step - m["train_start"]) if first_step else None,
            training_wall_s=train_wall,
            training_cpu_s=self.cpu["train_end"] - self.cpu["train_start"],
            samples_per_s=steps_run * global_batch_size / train_wall if steps_run and train_wall > 0 else None,
            checkpoint_saves_s=self.saves,
        )
