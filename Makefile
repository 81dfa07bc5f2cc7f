# edgellm: `make demo` shows the whole path, `make test` is what CI runs.
PY ?= python3
export PYTHONWARNINGS ?= ignore::FutureWarning

.PHONY: setup demo test test-fast bench arm64-check gpu-check clean
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m edgellm demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not arm64"

bench: setup
	$(PY) benchmarks/peers.py

arm64-check: setup
	$(PY) -m pytest -q -m arm64

# builds CUDA packages + a runtime bundle here; copy build/gpu-check-cuda-sm90 to the GPU machine and run
# `bash gpu_check.sh run` there (see the header of scripts/gpu_check.sh)
gpu-check: setup
	bash scripts/gpu_check.sh build -t $(or $(GPU_TARGET),cuda-sm90)

clean:
	rm -rf build .pytest_cache
