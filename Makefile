# The two commands of the README. Both set up .venv first (idempotent, see tools/setup_env.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env lint test demo benchmark clean

env:
	@bash tools/setup_env.sh

lint: env
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: env
	$(PY) tools/quickstart.py

benchmark: env
	$(PY) tools/benchmark_dcnv3.py

clean:
	rm -rf build *.egg-info ops_dcnv3/_C*.so .venv/.internimage-env
