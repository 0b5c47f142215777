"""Benchmarks: one command each (`python -m bench.NAME [--smoke]`), each printing a table with ratios
measured in the same run. Results and the commands that produced them: bench/RESULTS.md."""
