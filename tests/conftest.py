"""Shared test setup: CPU only, a persistent compilation cache, and the repository root."""

import os
import pathlib

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

# The files whose tests take longest on a 2-core machine (a cold `make test`), longest first.
SLOW_FIRST = (
    "test_preemption", "test_demo", "test_plan", "test_export", "test_prepared_stages",
    "test_accumulation", "test_faults", "test_convert", "test_models", "test_reliability",
    "test_multiprocess", "test_plot", "test_recipe_e2e", "test_pretrain", "test_chaos",
    "test_cli", "test_parallel", "test_launch", "test_benchmarks",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    """Long files first: `--dist loadfile` hands whole files to the workers in this order, so no
    long file starts last while the other workers idle. Within a file the order is kept."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
