"""Environments for test subprocesses: forced CPU devices, and which XLA:CPU compile pipeline."""

import os
import subprocess
import sys

# XLA:CPU's cheap compile pipeline: LLVM at -O0 and the classic loop emitters instead of the MLIR
# fusion emitters. Compiling is most of the suite's CPU time, and these flags cut it by about half;
# steps run a little slower, long elementwise loops (L-BFGS fits) more (benchmarks/RESULTS.md, "The
# test suite"). The math is the same (the last bits can differ: another instruction order), and
# every test process and subprocess gets them, so comparisons between processes see one compiler.
# test_pretrain's CLI test runs the default pipeline, the one users get (`default_pipeline_env`).
CHEAP_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int) -> str:
    """This process's XLA flags plus `devices` forced CPU devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def use_cheap_compiles() -> None:
    """Adds CHEAP_COMPILE_FLAGS to this process's XLA_FLAGS (inherited by its subprocesses), if
    this XLA knows them: it aborts a process on an unknown flag, and a newer jaxlib may drop one."""
    flags = os.environ.get("XLA_FLAGS", "")
    if all(flag in flags.split() for flag in CHEAP_COMPILE_FLAGS):
        return  # an xdist worker inherits its controller's
    cheap = " ".join((*CHEAP_COMPILE_FLAGS, flags)).strip()
    probe = "import jax; jax.numpy.zeros(1).block_until_ready()"
    env = dict(os.environ, XLA_FLAGS=cheap, JAX_PLATFORMS="cpu")
    if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0:
        os.environ["XLA_FLAGS"] = cheap
    else:
        print(f"tests: this XLA refuses {CHEAP_COMPILE_FLAGS}: default compiles", file=sys.stderr)


def fit_pipeline_env() -> dict[str, str]:
    """os.environ with LLVM at -O1 instead of -O0 (classic emitters kept): for a subprocess whose
    time goes to long loops rather than compiles (the tiny demo's L-BFGS fits). Unchanged where
    this XLA refused the cheap flags."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    level = CHEAP_COMPILE_FLAGS[0]
    flags = [("--xla_backend_optimization_level=1" if f == level else f) for f in flags]
    return dict(os.environ, XLA_FLAGS=" ".join(flags))


def default_pipeline_env() -> dict[str, str]:
    """os.environ without CHEAP_COMPILE_FLAGS: a subprocess that compiles as users' runs do."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in CHEAP_COMPILE_FLAGS]
    return dict(os.environ, XLA_FLAGS=" ".join(flags))
