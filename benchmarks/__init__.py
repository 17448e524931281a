"""The botwire-stream benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

Every module of this package that does not start with ``_`` is imported by ``__main__`` and joins
the run by decorating its functions with ``benchmarks._registry.benchmark``.
"""
