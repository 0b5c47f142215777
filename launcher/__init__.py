"""launcher: one YAML recipe → a correct, resumable, sharded fine-tune, locally, on Slurm or on Ray."""

__version__ = "0.1.0"
