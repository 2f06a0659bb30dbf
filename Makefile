# Two commands on a fresh machine: `make demo` and `make test`. Both set up what they need.
SHELL := /bin/bash
# The first of these that is Python >= 3.11 (simclr_jax's minimum); or name one: make PYTHON=python3.12
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.13 python3.12 python3.11 python3; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  2>/dev/null && { echo $$p; break; }; done)
endif
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The exact versions the README's numbers were measured with; `make CONSTRAINTS=` installs the
# newest versions setup.py allows instead.
CONSTRAINTS ?= constraints.txt
# Fashion-MNIST's four files (train-/t10k-, images-idx3/labels-idx1, -ubyte.gz): Debian's
# dataset-fashion-mnist puts them here; elsewhere: make demo FASHION_MNIST_DIR=/path/to/folder
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
FASHION_MNIST_FILES := $(foreach f,train-images-idx3 train-labels-idx1 t10k-images-idx3 \
  t10k-labels-idx1,$(FASHION_MNIST_DIR)/$(f)-ubyte.gz)
DATA_FLAG := $(if $(filter /usr/share/datasets/fashion-mnist,$(FASHION_MNIST_DIR)),,\
  --config.dataset.data_dir=$(FASHION_MNIST_DIR))
# Demo settings can be overridden: make demo DEMO_FLAGS="--config.num_steps=200"
DEMO_FLAGS ?=
export JAX_PLATFORMS ?= cpu

.PHONY: demo demo-sweep test test-slow lint setup data clean plan-gpu

setup: $(STAMP) data

$(STAMP): setup.py $(CONSTRAINTS)
	@test -x $(PY) || { \
	  if [ -z "$(PYTHON)" ] || ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	    echo "make: simclr_jax needs Python >= 3.11 ($(or $(PYTHON),python3.11-3.13 and python3) not found or older): install one and run make PYTHON=python3.11" >&2; \
	    exit 1; \
	  fi; \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[tfds,test,transfer,tpu]"
	@touch $(STAMP)

# Fashion-MNIST: real data, offline. Debian's dataset-fashion-mnist package, or the four files in
# a folder of your own (FASHION_MNIST_DIR).
data:
	@if ls $(FASHION_MNIST_FILES) >/dev/null 2>&1; then :; \
	elif [ "$(FASHION_MNIST_DIR)" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Debian's dataset-fashion-mnist (Fashion-MNIST files under /usr/share/datasets)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "make: the Fashion-MNIST files are not in $(FASHION_MNIST_DIR): install Debian's dataset-fashion-mnist (apt-get), or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and run make demo FASHION_MNIST_DIR=that/folder" >&2; \
	  exit 1; \
	fi

demo: setup
	$(PY) -m simclr_jax.demo $(DATA_FLAG) $(DEMO_FLAGS)

# The label-efficiency sweep (60 to 60,000 labels) on top of the demo's pretraining.
demo-sweep: setup
	$(PY) -m simclr_jax.demo --sweep $(DATA_FLAG) $(DEMO_FLAGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(VENV)/bin/pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=15 -m "not slow" tests

# Minutes of compiling the largest models (the planner's r152_3x_sk1 checks).
test-slow: setup
	$(VENV)/bin/pytest -q -m slow tests

# Compile-only GPU planning (python -m simclr_jax.plan --target=h100x8): the [plan-gpu] packages,
# pinned to the installed jax.
plan-gpu: $(STAMP)
	v=$$($(PY) -c 'import jax; print(jax.__version__)'); \
	$(PY) -m pip install -q "jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v" nvidia-cuda-nvcc-cu12

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .jax_cache
