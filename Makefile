# edgellm: `make demo` shows the whole path, `make test` is what CI runs.
PY ?= python3
export PYTHONWARNINGS ?= ignore::FutureWarning

.PHONY: setup demo test test-fast bench arm64-check clean
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

clean:
	rm -rf build .pytest_cache
