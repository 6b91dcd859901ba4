"""Build of the avmt package. Install with `pip install --no-build-isolation -e .` so that any compiled
part builds against the torch already installed (build isolation would fetch a fresh torch)."""

from setuptools import setup

setup()
