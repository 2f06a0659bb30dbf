"""The benchmarks run and say what they should (speed is measured in benchmarks/, never asserted).

The throughput smoke run compiles the tiny pretraining step twice (with and without augmentation);
it reuses the persistent compilation cache on reruns.
"""

from __future__ import annotations

import importlib.util
import pathlib
import py_compile
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, scaling  # noqa: E402

POSITIVE_FIELDS = (
    "median_step_ms",
    "images_per_s",
    "s_per_50k_images",
    "xla_gflop_per_step",
    "achieved_tflops",
    "mfu",
    "temp_mb",
    "argument_mb",
)


def key_values(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def run_script(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_throughput_tiny_prints_positive_figures():
    out = run_script(
        "benchmarks/throughput.py", "--preset=tiny", "--data=device,views", "--warmup=1",
        "--steps=2",
    )  # fmt: skip
    lines = out.splitlines()
    header = key_values(next(line for line in lines if line.startswith("preset=")))
    rows = {key_values(line)["variant"]: key_values(line) for line in lines if "variant=" in line}
    assert set(rows) == {"device", "views"}
    for name, row in rows.items():
        for field in POSITIVE_FIELDS:
            assert float(row[field]) > 0, (name, field, row)
        assert int(row["timed_steps"]) == 2
        # images/s is the global batch over the median step time.
        expected = int(header["global_batch"]) / (float(row["median_step_ms"]) / 1e3)
        assert float(row["images_per_s"]) == pytest.approx(expected, rel=1e-3)
    # Augmentation is work XLA counts: the full step has more FLOPs than the model alone.
    assert float(rows["device"]["xla_gflop_per_step"]) > float(rows["views"]["xla_gflop_per_step"])
    share = key_values(next(line for line in lines if line.startswith("augmentation_share=")))
    assert -1.0 < float(share["augmentation_share"]) < 1.0
    # The 'views' step is the library step minus augmentation: same loss on the same views.
    diff = key_values(next(line for line in lines if line.startswith("views_first_loss")))
    assert float(diff["views_first_loss_rel_diff"]) < 1e-4


def test_peer_torch_compiles_and_runs_if_torch_is_installed(tmp_path):
    py_compile.compile(
        str(ROOT / "benchmarks" / "peer_torch.py"), cfile=str(tmp_path / "p.pyc"), doraise=True
    )
    if not (importlib.util.find_spec("torch") and importlib.util.find_spec("torchvision")):
        pytest.skip("torch/torchvision not installed: only compiled")
    out = run_script(
        "benchmarks/peer_torch.py", "--preset=tiny", "--device=cpu", "--no_compile",
        "--warmup=1", "--steps=2",
    )  # fmt: skip
    row = key_values(next(line for line in out.splitlines() if "variant=" in line))
    assert float(row["median_step_ms"]) > 0 and float(row["images_per_s"]) > 0


def test_compare_gpu_driver_is_valid_shell():
    script = ROOT / "benchmarks" / "compare_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_communication_per_replica():
    # One replica: nothing to communicate.
    assert scaling.communication_row(1, 1000, 10, 64, 16) == {
        "n": 1, "gradients": 0.0, "gather": 0.0, "batch_norm": 0.0,
    }  # fmt: skip
    # Ring all-reduce: 2 (N-1)/N x 4 P bytes, so twice the fp32 parameters for large N.
    params = 25_600_000
    row8 = scaling.communication_row(8, params, 0, 4096, 128)
    assert row8["gradients"] == pytest.approx(2 * 7 / 8 * 4 * params)
    row1024 = scaling.communication_row(1024, params, 0, 4096, 128)
    assert row1024["gradients"] == pytest.approx(2 * 4 * params, rel=1e-3)
    # The projection gather (forward + its reduce-scatter) grows with the global batch:
    # 4096 x 2 views x 128 x 4 bytes = 4 MiB each way, far below the gradients.
    assert row1024["gather"] == pytest.approx(2 * 4096 * 2 * 128 * 4, rel=1e-3)
    assert row1024["gather"] < row1024["gradients"] / 20
    big_batch = scaling.communication_row(1024, params, 0, 65536, 128)
    assert big_batch["gather"] == pytest.approx(16 * row1024["gather"])
    assert big_batch["gradients"] == row1024["gradients"]


def test_collective_bytes_reads_optimised_hlo():
    hlo = """
  %all-reduce.3 = (f32[3,3,4,4]{3,2,1,0}, f32[10]{0}) all-reduce(f32[3,3,4,4]{3,2,1,0} %a, f32[10]{0} %b), replica_groups={{0,1}}, to_apply=%add
  %all-gather.1 = f32[32,16]{1,0} all-gather(f32[16,16]{1,0} %z), channel_id=1, dimensions={0}
  %reduce-scatter.2 = bf16[16,16]{1,0} reduce-scatter(bf16[32,16]{1,0} %g), dimensions={0}
  %all-reduce-start.4 = f32[4]{0} all-reduce-start(f32[4]{0} %c), to_apply=%add
  %all-reduce-done.4 = f32[4]{0} all-reduce-done(f32[4]{0} %all-reduce-start.4)
  %add.5 = f32[32,16]{1,0} add(f32[32,16]{1,0} %x, f32[32,16]{1,0} %y)
"""  # noqa: E501
    assert common.collective_bytes(hlo) == {
        "all-reduce": (3 * 3 * 4 * 4 + 10) * 4 + 4 * 4,
        "all-gather": 32 * 16 * 4,
        "reduce-scatter": 16 * 16 * 2,
    }


def test_accumulation_cost_prints_memory_and_times():
    out = run_script(
        "benchmarks/accumulation_cost.py", "--config=configs/pretrain_fashion_mnist.py:tiny",
        "--config.model.backbone=convnet", "--config.model.depth=4", "--cpu_devices=1",
        "--chunks=2@64", "--time=1,2@64", "--rounds=1", "--steps=1",
    )  # fmt: skip
    rows = [key_values(line) for line in out.splitlines() if line.startswith("variant=")]
    memory = {row["variant"]: row for row in rows if "temp_mb" in row}
    times = {row["variant"]: row for row in rows if "median_step_ms" in row}
    assert set(memory) == set(times) == {"1", "2@64"}
    assert memory["2@64"]["batch"] == "64" and memory["2@64"]["chunk_images"] == "32"
    assert all(float(row["temp_mb"]) > 0 for row in memory.values())
    assert float(times["1"]["vs_1"].rstrip("x")) == 1.0 and float(times["2@64"]["vs_1"][:-1]) > 0
