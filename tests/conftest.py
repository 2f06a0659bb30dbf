"""Shared test setup: CPU only, a persistent compilation cache, the cheap compile pipeline, the
files' order (longest first) and closing the data streams a test leaves open."""

import os
import pathlib
import sys

import pytest
from devices import use_cheap_compiles

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / ".jax_cache"

# Set before jax is imported anywhere in the test process (and inherited by subprocesses).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
# Small programs too (the tiny models' inits and predicts take 0.1-0.5 s): test processes share them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One thread each for OpenMP (scikit-learn's t-SNE) and OpenBLAS (NumPy's matmuls): the xdist
# workers and their subprocesses already fill the cores, and these pools' threads spin while
# they wait, which costs most on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The cheap XLA:CPU compile pipeline for every test process and subprocess (tests/devices.py).
use_cheap_compiles()

# The files whose tests take longest on a 2-core machine (a cold `make test`, 3 workers), longest
# first. The Makefile passes --no-loadscope-reorder: xdist otherwise hands out files by their
# number of tests, which can start a long file last.
SLOW_FIRST = (
    "test_plan", "test_export", "test_demo", "test_preemption", "test_faults",
    "test_prepared_stages", "test_convert", "test_accumulation", "test_models", "test_reliability",
    "test_recipe_e2e", "test_multiprocess", "test_pretrain", "test_benchmarks", "test_parallel",
    "test_plot", "test_launch", "test_chaos", "test_memory",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    """Long files first: `--dist loadfile` hands whole files to the workers in this order, so no
    long file starts last while the other workers idle. Within a file the order is kept."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture(autouse=True)
def _close_data_streams():
    """Closes the tfds streams a test leaves open, while the process is fully alive: left to the
    exit (step_stream's atexit), an xdist worker's can block its exit until xdist kills it at its
    exit timeout, which delays the end of the whole run."""
    yield
    step_stream = sys.modules.get("simclr_jax.data.step_stream")
    if step_stream is not None:
        step_stream.close_open_streams()
