"""Benchmark support: memory of a training step per sharing scheme (:mod:`avmt.bench.memory`), the largest batch
that fits (:mod:`avmt.bench.search`) and the report (``python -m avmt.bench report``, :mod:`avmt.bench.report`)."""
