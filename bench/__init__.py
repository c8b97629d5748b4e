"""Benchmarks of the mxd_fast ops and of a whole MxD training step: `python -m bench` (see bench/cli.py),
and the same cases as pytest-benchmark tests (bench/test_bench.py)."""
