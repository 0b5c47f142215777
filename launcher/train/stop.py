"""A collective stop request: a signal to any rank stops every rank at the same step boundary.

Schedulers warn before they preempt a job or hit its time limit (Slurm: `--signal=USR1@grace`,
`scancel --signal=USR1`). A rank only notes the signal; at each step boundary the ranks all-reduce
their notes, so all of them agree on the step, write one checkpoint together and exit with
status 75 (launcher.errors.ExitCode.STOPPED). What happens next (requeue, relaunch) is the backend's
business, not the trainer's.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNAL = signal.SIGUSR1


class StopRequest:
    """Install once per rank, early (before a scheduler could signal): the default action of USR1 kills."""

    def __init__(self) -> None:
        self.signalled = False
        # Ray Train runs the training function in a thread, where no handler can be installed; Ray has its
        # own way of stopping workers, so there the request simply never comes.
        if threading.current_thread() is threading.main_thread():
            signal.signal(STOP_SIGNAL, self._note)

    def _note(self, signum, frame) -> None:
        self.signalled = True

    def agreed(self, device) -> bool:
        """True on every rank once any rank was signalled; one scalar all-reduce per call."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signalled else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
