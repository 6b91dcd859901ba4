# Shortcuts for the commands the README and CONTRIBUTING.md give; each target is one of them.
PY ?= python

.PHONY: install test lint format bench-quick bench-full gpu-check gpu-dry-run report

install:  ## README command 1: torch (if absent), build tools, avmt with its compiled ops
	$(PY) -m pip install "torch>=2.11,<2.15" "setuptools>=64" wheel pybind11 ninja
	$(PY) -m pip install --no-build-isolation -e ".[test,lint]"

test:  ## tests/ and the benchmarks once each in quick mode
	$(PY) -m pytest -q

lint:  ## what .ci/run checks first
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .

bench-quick:  ## the benchmark suite in quick mode, JSON + report under benchmarks/results/
	$(PY) -m avmt.bench run

bench-full:  ## full sweeps (slow; the GPU cases need CUDA)
	$(PY) -m avmt.bench run --full

gpu-check:  ## on a GPU machine: every GPU path, JSON in benchmarks/results/gpu-<device>-<date>.json
	$(PY) -m avmt.bench gpu

gpu-dry-run:  ## the same code on the CPU with tiny shapes (what CI runs)
	$(PY) -m avmt.bench gpu --dry-run --out runs/gpu-dry-run.json

report:  ## benchmarks/results/report.md from every result file there
	$(PY) -m avmt.bench report
