"""Profile the steady state of the pretraining step: recompiles, host transfers, donation, dispatch.

    python benchmarks/profile_step.py                 # 1 CPU device, tiny model
    python benchmarks/profile_step.py --devices 2     # forced CPU devices (cross-device copies)

Checks, each printed as `check=... result=...`:
  compiles      compilations during warm steps of the loop (must be 0: no retracing);
  transfers     the warm loop (data.batch, step, metrics) under jax.transfer_guard('disallow'):
                any implicit host<->device or device<->device copy raises;
  donation      donation warnings, and how many state buffers the compiled step aliases to outputs
                (every state leaf should be: the update is in place);
  dispatch      host time to enqueue one step (data.batch + the call) against the step's time;
  trainer       pretrain.train_and_evaluate itself for a few steps with jax_log_compiles: the
                functions compiled more than once (recompilation in the real loop).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1, help="forced CPU devices")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip_trainer", action="store_true")
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.devices > 1:  # read by jax at import
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    )
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from simclr_jax import parallel, pretrain  # noqa: E402
from simclr_jax.data import pipeline  # noqa: E402


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while `active`."""

    def __init__(self):
        self.active, self.count = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event.endswith("backend_compile_duration"):
            self.count += 1


def steady_state_checks(args) -> None:
    counter = CompileCounter()
    common.enable_compilation_cache(str(common.DEFAULT_CACHE_DIR))
    mesh = parallel.make_mesh()
    config = common.bench_config(
        depth=18, width=1, sk_ratio=0.0, base_width=4, image_size=32,
        global_batch=args.batch, dtype="float32", proj_out_dim=16,
    )  # fmt: skip
    model, state, dp = common.build(config, mesh)
    arrays = common.synthetic_arrays(4 * args.batch, 32, 3)
    data = pipeline.DeviceResidentData(arrays, global_batch=args.batch, seed=0, mesh=mesh)
    step = common.map_step(dp, pretrain.make_train_step(model, config), config)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = step.lower(state, data.batch(0)).compile()
        state, metrics = step(state, data.batch(0))  # the jitted entry point, as the trainer
        jax.block_until_ready(state)
    donation_warnings = [str(w.message)[:160] for w in caught if "donat" in str(w.message)]
    aliases = len(re.findall(r"\{[0-9, ]*\}: \(\d+, \{[0-9, ]*\}", _alias_line(compiled.as_text())))
    leaves = len(jax.tree.leaves(state))
    print(
        f"check=donation state_leaves={leaves} aliased_outputs={aliases} "
        f"donation_warnings={len(donation_warnings)} {donation_warnings[:1]}"
    )

    counter.active = True
    for i in range(1, 3):
        state, metrics = step(state, data.batch(i))
        dp.first(metrics)
    jax.block_until_ready(state)
    warm_compiles_before_guard = counter.count

    transfers = {}
    for what in ("step", "data.batch"):
        try:
            for i in range(3, 3 + args.steps):
                with jax.transfer_guard("disallow" if what == "data.batch" else "allow"):
                    batch = data.batch(i)
                with jax.transfer_guard("disallow" if what == "step" else "allow"):
                    state, metrics = step(state, batch)
                    dp.first(metrics)
                    jax.block_until_ready(state)
            transfers[what] = "none"
        except Exception as err:  # the guard names the offending transfer
            transfers[what] = f"BLOCKED: {str(err).splitlines()[0][:200]}"
    print(
        f"check=compiles warm_steps={2 + args.steps} compiles={counter.count} "
        f"(before guard {warm_compiles_before_guard})"
    )
    for what, result in transfers.items():
        print(f"check=transfers guard=disallow around={what} result={result}")

    batch_ms, call_ms, total_ms = [], [], []
    for i in range(20, 20 + args.steps):
        start = time.perf_counter()
        batch = data.batch(i)
        batch_ms.append(1e3 * (time.perf_counter() - start))
        state, metrics = step(state, batch)
        call_ms.append(1e3 * (time.perf_counter() - start) - batch_ms[-1])
        jax.block_until_ready(metrics)
        total_ms.append(1e3 * (time.perf_counter() - start))
    median = lambda xs: sorted(xs)[len(xs) // 2]
    print(
        f"check=dispatch data_batch_ms={median(batch_ms):.2f} step_call_ms={median(call_ms):.2f} "
        f"step_ms={median(total_ms):.1f}"
    )
    del compiled


def _alias_line(hlo_text: str) -> str:
    for line in hlo_text.splitlines():
        if "input_output_alias" in line:
            return line
    return ""


def trainer_recompiles(steps: int) -> None:
    """Run the real trainer with jax_log_compiles and count compilations per function name."""
    from simclr_jax.configs import pretrain_fashion_mnist

    config = pretrain_fashion_mnist.get_config("tiny")
    config.dataset.train_split = "train[:1024]"
    config.dataset.eval_split = ""
    config.num_steps = steps
    config.log_every_steps = 2
    config.checkpoint_every_steps = 1000
    names: collections.Counter[str] = collections.Counter()
    messages = collections.defaultdict(list)

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = re.search(r"Compiling (\S+)", record.getMessage())
            if match:
                names[match.group(1)] += 1
                messages[match.group(1)].append(record.getMessage()[:200])

    handler = Capture()
    logging.getLogger("jax").addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            pretrain.train_and_evaluate(config, workdir)
    finally:
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax").removeHandler(handler)
    repeated = {name: n for name, n in names.items() if n > 1}
    print(
        f"check=trainer steps={steps} compiled_functions={len(names)} "
        f"compilations={sum(names.values())} compiled_more_than_once={repeated}"
    )
    for name in repeated:
        for message in messages[name]:
            print(f"  {message}")


def main() -> None:
    print(f"devices={len(jax.devices())} platform={jax.default_backend()} jax={jax.__version__}")
    steady_state_checks(ARGS)
    if not ARGS.skip_trainer:
        trainer_recompiles(steps=8)


if __name__ == "__main__":
    main()
