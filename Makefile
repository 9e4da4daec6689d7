# The two README commands: `make demo` (the main job on the embedded synthetic data) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint gpu-test

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) train.py --preset demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

gpu-test: setup
	$(PY) -m pytest -q -m gpu
