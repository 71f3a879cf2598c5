# Every install path pins torch==2.13.0 and installs it alone, first: any other torch requirement
# resolves to the registry's newest build and pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
# llama-cpp-python compiles llama.cpp at install (3-5 min), here for this CPU's vector units named
# one by one (AVX-512, VNNI, BF16 where present) and never its AMX kernels, which trap on some Xeons:
# convllava_edge/buildflags.py. Measured on the benchmark Llama (benchmarks/llm_build_bench.py): 1.7-2x
# the prompt processing of the portable AVX2 build, decode at 83-86% of the bandwidth bound. Whatever
# the build, the runtime probes llama.cpp's risky CPU paths before loading a model (native.py).
export CMAKE_ARGS ?= $(shell $(PYTHON) convllava_edge/buildflags.py)
# The wheel is built once, with these flags, into a wheelhouse every venv installs from: pip's own
# cache is keyed by the sdist alone and would hand back a wheel built with other flags or on another CPU.
WHEELHOUSE ?= .wheelhouse
PIP_INSTALL := $(BIN)/pip install -q --find-links $(WHEELHOUSE)

.PHONY: install dev test ask clean wheelhouse

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(WHEELHOUSE)/.built: | $(BIN)/python
	$(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(WHEELHOUSE) $(LLAMA_CPP_PYTHON)
	touch $@

wheelhouse: $(WHEELHOUSE)/.built

$(VENV)/.runtime-installed: pyproject.toml $(WHEELHOUSE)/.built | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(WHEELHOUSE)/.built | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(PIP_INSTALL) -e ".[export,test]"
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
