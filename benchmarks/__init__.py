"""Benchmarks of label_attention against the ways one can get label masses without it.

`python -m benchmarks.run` sweeps shapes and writes benchmarks/results/<device>/; the pytest-benchmark
suite is `pytest benchmarks/ --benchmark-only`. See benchmarks/README.md.
"""
