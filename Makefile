# Two commands on a fresh machine: `make demo` and `make test`. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Demo settings can be overridden: make demo DEMO_FLAGS="--config.num_steps=200"
DEMO_FLAGS ?=
export JAX_PLATFORMS ?= cpu

.PHONY: demo demo-sweep test test-slow lint setup data clean plan-gpu

setup: $(STAMP) data

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[tfds,test,transfer,tpu]"
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package: real data, offline.
data:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Debian's dataset-fashion-mnist (Fashion-MNIST files under /usr/share/datasets)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST files are missing ($(FASHION_MNIST)) and apt-get is not available."; \
	  echo "Install Debian's dataset-fashion-mnist, or use tfds: --config.dataset.source=tfds"; \
	  exit 1; \
	fi

demo: setup
	$(PY) -m simclr_jax.demo $(DEMO_FLAGS)

# The label-efficiency sweep (60 to 60,000 labels) on top of the demo's pretraining.
demo-sweep: setup
	$(PY) -m simclr_jax.demo --sweep $(DEMO_FLAGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=15 -m "not slow" tests

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
