"""Backends turn (recipe, plan) into running ranks (base.py: the contract). They know nothing of models.

BACKENDS maps a cluster profile's `backend:` to its class; it is total over the profile schemas
(config.cluster.PROFILES), which tests/unit/test_registries.py checks.
"""

from __future__ import annotations

from launcher.backends.base import Backend
from launcher.backends.local import LocalBackend
from launcher.backends.ray import RayBackend
from launcher.backends.slurm import SlurmBackend

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (LocalBackend, SlurmBackend, RayBackend)}


def backend_for(profile) -> Backend:
    """The backend a loaded cluster profile names."""
    return BACKENDS[profile.backend](profile)
