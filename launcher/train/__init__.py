"""Code that runs on every rank, started by a backend from the launch spec: the run lifecycle (run.py), the
engines (one per strategy), task hooks, data, model, losses, metrics, checkpoints, reporting, heartbeats,
the stop request and the rank-side pre-flight. Nothing here knows about Slurm, Ray or the command line."""
