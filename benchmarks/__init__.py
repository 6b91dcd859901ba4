"""The benchmark suite (pytest-benchmark); a package so that its module names cannot clash with tests/."""
