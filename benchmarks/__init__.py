"""The performance harness: the whole nightly pipeline against a hand-written DuckDB baseline.

``python -m benchmarks.run`` (``make bench``) generates a synthetic drop, runs the Dagster
nightly job and the plain-SQL baseline (``benchmarks.baseline``) on it, each in its own
subprocess so that its peak memory is its own, and prints a table with PASS/MISS per target.
Results are written to ``benchmarks/results/<timestamp>.json`` (git-ignored).
"""
