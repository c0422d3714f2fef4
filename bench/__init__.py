"""Benchmarks: one script per question, results appended to docs/BENCHMARKS.md (see bench/common.py)."""
