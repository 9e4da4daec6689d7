# The two README commands: `make demo` (the main job on the embedded synthetic data) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint gpu-test gpu-check

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) train.py --preset demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

gpu-test: setup
	$(PY) -m pytest -q -m gpu

# GPU acceptance in one command (README "GPU acceptance"); no setup step: on the bare GPU machine it runs with the
# system python3 that holds PyTorch and the wheels of .gpu-wheels/ (scripts/gpu_wheels.sh). GPU_CHECK_DEVICE=cpu
# rehearses the same sequence at tiny sizes.
CHECK_PY := $(shell [ -x $(PY) ] && echo $(PY) || echo python3)

gpu-check:
	$(CHECK_PY) scripts/gpu_check.py
