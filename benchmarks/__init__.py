"""Benchmarks of sa_rollback against the other ways of isolating database tests.

Run ``python -m benchmarks`` (``--quick`` for a short run); see ``benchmarks/README.md``.
The package measures and reports; it asserts nothing about speed.
"""
