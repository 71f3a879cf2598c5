# Every install path pins torch==2.13.0 and installs it alone, first: any other torch requirement
# resolves to the registry's newest build and pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama-cpp-python compiles llama.cpp at install (3-5 min). The portable build (no -march=native,
# no mtmd) compiles ~1.5 min faster and measured as fast on these machines.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: install dev test ask clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,test]"
	touch $@

install: $(VENV)/.runtime-installed

dev: $(VENV)/.dev-installed

test: dev
	$(BIN)/python -m pytest -q

# The README's first command: the demo model shipped in the package answers about an example image.
ask: install
	$(BIN)/convllava-edge ask examples/shapes-1.png "How many shapes are there?"

clean:
	rm -rf out .pytest_cache
