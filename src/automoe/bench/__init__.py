"""The benchmark harness behind `automoe bench` (see cli.py) and the workloads of shared/BENCHMARKS.md."""
