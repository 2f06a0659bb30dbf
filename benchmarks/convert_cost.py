"""Cost of importing an official checkpoint: time and peak memory of `simclr_jax.convert`.

    JAX_PLATFORMS=cpu python benchmarks/convert_cost.py [--arch r50_1x_sk1] [--repeats 3]

Builds the architecture's TF1 'pretrained' checkpoint from the fixture layout and weight generator
(../shared/fixtures/official_checkpoints: every entry, Momentum slots and global_step included, as
a released file), then converts it REPEATS times, each in a fresh process: the command's wall time,
the time of the convert() call alone (after the imports), the resident memory after the imports
and its peak during convert() (sampled every 5 ms), and the process peak (ru_maxrss) next to a
process that only imports the same modules. Sizes on disk of the checkpoint and workdir too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(
    os.environ.get(
        "SIMCLR_OFFICIAL_FIXTURES", ROOT.parent / "shared" / "fixtures" / "official_checkpoints"
    )
)
# Runs in the child: imports (timed), then convert() (timed) while a thread samples the resident
# memory every 5 ms (the process peak, ru_maxrss, is usually set by importing TensorFlow).
CHILD = """
import json, resource, sys, threading, time
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) / 1024
start = time.perf_counter()
import tensorflow, jax
from simclr_jax import convert
imported = time.perf_counter()
before, peak, running = rss_mb(), [0.0], True
def sample():
    while running:
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)
thread = threading.Thread(target=sample)
thread.start()
if sys.argv[1] != "--imports-only":
    convert.convert(sys.argv[1], sys.argv[2])
done = time.perf_counter()
running = False
thread.join()
print(json.dumps(dict(import_s=imported - start, convert_s=done - imported,
                      rss_before_mb=before, rss_peak_mb=max(peak[0], rss_mb()),
                      process_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def disk_mb(path: pathlib.Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def child(*args: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="r50_1x_sk1")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    spec = importlib.util.spec_from_file_location("official_generator", FIXTURES / "generator.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.check_stream()
    layout = generator.load_layout(str(FIXTURES / "layouts" / f"tf1_{args.arch}_pretrain.json"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "official"
        generator.write_tf_checkpoint(layout["variables"], str(folder / "model.ckpt-250228"))
        imports = child("--imports-only")
        runs = []
        for i in range(args.repeats):
            workdir = pathlib.Path(tmp) / f"converted{i}"
            runs.append(child(str(folder), str(workdir)))
            workdir_mb = disk_mb(workdir)
            shutil.rmtree(workdir)
        load = os.getloadavg()[0]
        print(
            f"host={platform.processor() or platform.machine()} cpus={os.cpu_count()} "
            f"python={platform.python_version()} load1={load:.1f}"
        )
        print(
            f"arch={args.arch} entries={len(layout['variables'])} "
            f"checkpoint_mb={disk_mb(folder):.0f} workdir_mb={workdir_mb:.0f} repeats={args.repeats}"
        )
        convert_s = [r["convert_s"] for r in runs]
        extra = [r["rss_peak_mb"] - r["rss_before_mb"] for r in runs]
        print(
            f"convert_s_median={statistics.median(convert_s):.2f} "
            f"convert_s_min={min(convert_s):.2f} "
            f"import_s_median={statistics.median(r['import_s'] for r in runs):.2f} "
            f"rss_after_imports_mb={statistics.median(r['rss_before_mb'] for r in runs):.0f} "
            f"rss_peak_during_convert_mb={max(r['rss_peak_mb'] for r in runs):.0f} "
            f"convert_extra_mb_max={max(extra):.0f} "
            f"process_peak_mb={max(r['process_peak_mb'] for r in runs):.0f} "
            f"imports_only_process_peak_mb={imports['process_peak_mb']:.0f}"
        )


if __name__ == "__main__":
    main()
