"""Data pipeline (docs/method.md §5): synthetic data, dataset preparation, sequence sampling, log-mel and loaders.

Submodules import their heavy dependencies (PyAV, DALI) lazily, so ``import avmt.data`` is cheap.
"""
