"""Code that runs on every rank. Nothing here knows about Slurm, Ray or the command line."""
