# Every install path pins torch==2.13.0 and installs it alone, first: any other torch requirement
# resolves to the registry's newest build and pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama-cpp-python compiles llama.cpp at install (3-5 min). The portable build (no -march=native,
# no mtmd) compiles ~1.5 min faster and measured as fast on these machines.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: install dev test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,test]"
	touch $@

install: $(BIN)/python
	$(BIN)/pip install -q -e .

dev: $(VENV)/.dev-installed

test: dev
	$(BIN)/python -m pytest -q

# Until the demo model ships: make a tiny random checkpoint, export it, encode an example image.
demo: dev
	rm -rf out/tiny out/tiny-bundle
	$(BIN)/python -m convllava_edge.export.synthetic out/tiny
	$(BIN)/convllava-edge export out/tiny/sft --out out/tiny-bundle --vision-type int8 --vision-type fp32
	$(BIN)/convllava-edge encode examples/probe.jpg --model out/tiny-bundle

clean:
	rm -rf out .pytest_cache
