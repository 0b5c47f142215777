"""One typed view of the SLURM_* variables (like submitit's JobEnvironment), and where the nodes meet."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


class AllocationError(Exception):
    """The allocation cannot host this run (e.g. its first node's name does not resolve)."""


@dataclass(frozen=True)
class SlurmEnvironment:
    """One typed view of the SLURM_* variables, like submitit's JobEnvironment."""

    job_id: str
    num_nodes: int
    nodelist: str
    node_id: int | None  # None outside a step (batch script or salloc shell)
    restart_count: int

    @classmethod
    def detect(cls, environ=os.environ) -> SlurmEnvironment | None:
        if "SLURM_JOB_ID" not in environ:
            return None
        in_step = "SLURM_STEP_ID" in environ
        return cls(
            job_id=environ["SLURM_JOB_ID"],
            num_nodes=int(environ.get("SLURM_JOB_NUM_NODES", "1")),
            nodelist=environ.get("SLURM_JOB_NODELIST", ""),
            node_id=int(environ["SLURM_NODEID"]) if in_step else None,
            restart_count=int(environ.get("SLURM_RESTART_COUNT", "0")),
        )

    @property
    def rendezvous_port(self) -> int:
        """Same on every node without talking; below Linux's ephemeral range (32768+)."""
        return 15000 + int(self.job_id.split("_")[0]) % 15000

    def master_host(self) -> str:
        """The first node of the allocation, checked to resolve. Never localhost by default: on a
        multi-node job that would make every node train alone."""
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", self.nodelist], capture_output=True, text=True, timeout=60, check=True
            ).stdout.split()
        except (OSError, subprocess.SubprocessError) as exc:
            raise AllocationError(
                f"cannot expand SLURM_JOB_NODELIST={self.nodelist!r} with `scontrol show hostnames`: {exc}"
            ) from None
        if not out:
            raise AllocationError(f"SLURM_JOB_NODELIST={self.nodelist!r} names no host")
        try:
            socket.getaddrinfo(out[0], self.rendezvous_port)
        except OSError as exc:
            raise AllocationError(
                f"the first node {out[0]!r} of {self.nodelist!r} does not resolve ({exc}); the ranks cannot meet there"
            ) from None
        return out[0]
