"""benchmarks/gpu_suite.sh without a GPU: shellcheck, --dry-run (prints the commands, runs
nothing; the pretraining's overrides make a valid GPU config), and the real path with fake
programs standing in for python and nvidia-smi: time limits, failures, rows and the summary."""

import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from simclr_jax import optim, validation

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
SECTION = "## GPU suite runs (benchmarks/gpu_suite.sh)"
FM_FILES = [
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
]  # fmt: skip

OURS_DEVICE = (
    "variant=device median_step_ms=80 min_step_ms=79 images_per_s=3200 s_per_50k_images=15.62 "
    "xla_gflop_per_step=2000 achieved_tflops=25 mfu=0.4 temp_mb=1 compile_s=9 timed_steps=30"
)
OURS_VIEWS = (
    "variant=views median_step_ms=75 min_step_ms=74 images_per_s=3413.3 s_per_50k_images=14.65 "
    "xla_gflop_per_step=1900 achieved_tflops=25 mfu=0.41 temp_mb=1 compile_s=8 timed_steps=30"
)
PEER = (
    "variant=torch_views median_step_ms=100 min_step_ms=99 images_per_s=2560 "
    "s_per_50k_images=19.53 warmup_s=30 loss=7.1 timed_steps=30"
)
PLAN = (
    '{"target": "h200x1", "memory_bytes": {"total": 3221225472, "capacity": 112742891520}, '
    '"fits": true, "flops_per_image": 1.7e9, "step_time_bound_s": 0.0125, '
    '"images_per_s_bound": 40960.0, "limited_by": "memory"}'
)
# Stands in for the interpreter: canned key=value lines as throughput.py and peer_torch.py print
# them, a metrics.jsonl as the trainer writes it; each call is recorded in $FAKE_LOG.
FAKE_PYTHON = f"""#!/usr/bin/env bash
echo "python $*" >>"$FAKE_LOG"
case "$1" in
  -) exec {sys.executable} "$@" ;;
  -c) case "$2" in
        *"import flax"*) echo "gpu 0.11.2 NVIDIA H200" ;;
        *"import torch"*) echo "cuda 2.11.0" ;;
      esac ;;
  benchmarks/throughput.py)
    [[ "$FAKE_FAIL" != "ours_$3" ]] || {{ echo "boom" >&2; exit 1; }}
    echo "platform=gpu device_kind='NVIDIA H200' devices=1"
    echo "{OURS_DEVICE}"
    echo "{OURS_VIEWS}"
    echo "augmentation_share=0.0625 (1 - views/device, median step times)" ;;
  benchmarks/peer_torch.py)
    echo "{PEER}" ;;
  -m)
    if [[ "$2" == simclr_jax.pretrain ]]; then
      for arg in "$@"; do [[ "$arg" != --workdir=* ]] || workdir="${{arg#--workdir=}}"; done
      mkdir -p "$workdir"
      {{
        echo '{{"hparams": {{"batch_size": 512}}}}'
        echo '{{"step": 1100, "contrastive_loss": 5.5, "probe_acc": 0.75, "learning_rate": 0.01}}'
        echo '{{"step": 1100, "steps_per_sec": 20.0, "images_per_sec": 10240.0}}'
        echo '{{"step": 1170, "contrastive_loss": 5.25, "probe_acc": 0.78125}}'
        echo '{{"step": 1170, "eval_probe_top1": 0.8125, "eval_probe_top5": 0.99}}'
      }} >"$workdir/metrics.jsonl"
      [[ -z "$FAKE_SLOW_PRETRAIN" ]] || exec sleep 60
    elif [[ "$2" == simclr_jax.plot ]]; then
      for arg in "$@"; do [[ "$arg" != --out=* ]] || printf 'PNG' >"${{arg#--out=}}"; done
    elif [[ "$2" == simclr_jax.plan ]]; then
      for arg in "$@"; do [[ "$arg" != --out=* ]] || out="${{arg#--out=}}"; done
      echo '{PLAN}' >"$out"
    fi ;;
esac
"""


def fake_program(directory: pathlib.Path, name: str, body: str) -> pathlib.Path:
    path = directory / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fakes(tmp_path):
    """A bin folder of fakes first on PATH (python3, nvidia-smi, timeout record their calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    python = fake_program(bin_dir, "fakepython", FAKE_PYTHON)
    record = '#!/usr/bin/env bash\necho "$(basename "$0") $*" >>"$FAKE_LOG"\n'
    for name in ("python3", "python", "timeout"):
        fake_program(bin_dir, name, record)
    fake_program(bin_dir, "nvidia-smi", record + 'echo "NVIDIA H200"\n')
    data_dir = tmp_path / "fm"
    data_dir.mkdir()
    for name in FM_FILES:
        (data_dir / name).write_bytes(b"")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_FAIL": "",
        "FAKE_SLOW_PRETRAIN": "",
    }
    return {"python": str(python), "log": log, "data_dir": data_dir, "env": env, "bin": bin_dir}


def suite(*args: str, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def test_passes_shellcheck_and_is_strict_bash_with_usage():
    checker = pathlib.Path(sys.executable).parent / "shellcheck"  # from the [test] extra
    result = subprocess.run(
        [str(checker), "-x", str(SCRIPT)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in SCRIPT.read_text() and os.access(SCRIPT, os.X_OK)
    assert suite("--help").stdout.startswith("usage: ")
    for bad in (["--no-such-option"], ["--parts", "gpu"], ["--limit", "nope=3"]):
        result = suite(*bad, check=False)
        assert result.returncode == 2 and result.stderr.startswith("gpu_suite.sh: error:"), bad


def parse_pretrain_config(argv: list[str]):
    """The config the trainer's command line would build (ml_collections' own flag parser)."""
    config_args = [a for a in argv if a.startswith("--config")]
    values = flags.FlagValues()
    argv = ["pretrain", *config_args]
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def test_dry_run_prints_every_command_and_runs_nothing(fakes):
    py = fakes["python"]
    result = suite("--dry-run", "--python", py, "--data_dir", str(fakes["data_dir"]),
                   env=fakes["env"])  # fmt: skip
    assert not fakes["log"].exists()  # not even the checks ran
    lines = commands(result.stdout)
    limits = [int(line[1]) if line[1] != "-k" else int(line[3]) for line in lines]
    assert all(line[0] == "timeout" for line in lines) and sum(limits) <= 600
    checks, parts = lines[:3], [line[4:] for line in lines[3:]]
    assert checks[0][2] == "nvidia-smi"
    assert [c[2:4] for c in checks[1:]] == [[py, "-c"], [py, "-c"]]
    assert "import flax, ml_collections" in checks[1][4] and "import torch" in checks[2][4]
    assert parts[:4] == [
        [py, "benchmarks/throughput.py", "--preset", "r18_cifar", "--data", "device,views",
         "--peak_tflops", "989"],
        [py, "benchmarks/peer_torch.py", "--preset", "r18_cifar", "--device", "cuda"],
        [py, "benchmarks/throughput.py", "--preset", "r50", "--data", "device,views",
         "--peak_tflops", "989"],
        [py, "benchmarks/peer_torch.py", "--preset", "r50", "--device", "cuda"],
    ]  # fmt: skip
    plan, pretrain, plot = parts[4], parts[5], parts[6]
    assert pretrain[:3] == [py, "-m", "simclr_jax.pretrain"]
    workdir = next(a.split("=", 1)[1] for a in pretrain if a.startswith("--workdir="))
    assert plot[:4] == [py, "-m", "simclr_jax.plot", f"--workdir={workdir}"]
    # The plan is the same config (a dry run asks no GPU its name: the default target).
    assert plan[:3] == [py, "-m", "simclr_jax.plan"] and "--target=h100x1" in plan
    assert [a for a in plan if a.startswith("--config")] == [
        a for a in pretrain if a.startswith("--config")
    ]
    # The flags exist where the commands send them (those scripts are not run here).
    throughput = (ROOT / "benchmarks" / "throughput.py").read_text()
    peer = (ROOT / "benchmarks" / "peer_torch.py").read_text()
    assert all(f'"--{flag}"' in throughput for flag in ("preset", "data", "peak_tflops"))
    assert all(f'"--{flag}"' in peer for flag in ("preset", "device"))
    assert '"r18_cifar"' in peer and '"r50"' in peer


def test_dry_run_pretraining_is_the_gpu_preset_with_the_reference_schedule_shape(fakes):
    result = suite("--dry-run", "--parts", "pretrain", "--pretrain_epochs", "8",
                   "--data_dir", str(fakes["data_dir"]), env=fakes["env"])  # fmt: skip
    (pretrain,) = [line[4:] for line in commands(result.stdout) if "simclr_jax.pretrain" in line]
    config = parse_pretrain_config(pretrain)
    validation.validate_pretrain(config)
    # ResNet-18 at full width with the CIFAR stem (automatic at 28 px), bf16, the local files.
    assert (config.model.depth, config.model.base_width, config.model.width_multiplier) == (
        18, 64, 1,
    )  # fmt: skip
    assert config.model.cifar_stem is None and config.dataset.image_size <= 32
    assert config.dtype == "bfloat16" and config.dataset.source == "local"
    assert config.dataset.data_dir == str(fakes["data_dir"])
    # 8 epochs of 60,000 images in batches of 512; warmup 5% of the run, then cosine (as the
    # preset's 10 of 200 epochs); the probe evaluated four times.
    schedule = optim.train_schedule(config, 60_000)
    # The reference's step counts: N * epochs // B + 1, warmup round(warmup_epochs * N // B).
    assert schedule.total_steps == 60_000 * 8 // 512 + 1 == 938
    assert schedule.warmup_steps == round(config.optim.warmup_epochs * 60_000 // 512) == 46
    assert config.evals.probe.every_steps == config.evals.knn.every_steps == 936 // 4


def test_dry_run_names_missing_data_and_leaves_out_unwanted_parts(fakes, tmp_path):
    result = suite("--dry-run", "--parts", "throughput,pretrain", "--data_dir",
                   str(tmp_path / "empty"), env=fakes["env"])  # fmt: skip
    run = [" ".join(line) for line in commands(result.stdout)]
    assert not any("peer_torch" in line or "import torch" in line for line in run)
    assert sum("throughput.py" in line for line in run) == 2
    assert not any("simclr_jax.pretrain" in line for line in run)
    assert f"# pretrain skipped: Fashion-MNIST files missing in {tmp_path / 'empty'}" in (
        result.stdout
    )


def section_rows(text: str) -> list[str]:
    """The rows of the suite's table: the '|' lines after its heading, up to the next heading."""
    after = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [line for line in after.splitlines() if line.startswith("| 20")]


def test_real_path_with_fakes_records_rows_and_survives_failures(fakes, tmp_path):
    (fakes["bin"] / "timeout").unlink()  # the real one: its limits are under test
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## GPU\n\nearlier text\n")
    common = ["--python", fakes["python"], "--data_dir", str(fakes["data_dir"]),
              "--results", str(results), "--workdir", str(tmp_path / "run")]  # fmt: skip
    first = suite(*common, "--log_dir", str(tmp_path / "logs1"), env=fakes["env"])
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n## GPU\n\nearlier text\n")
    rows = section_rows(text)
    device = "| NVIDIA H200; jax 0.11.2; torch 2.11.0 |"
    assert len(rows) == 6 and all(device in row and "| ok (" in row for row in rows)
    ours_r18, peer_r18, ours_r50, peer_r50, plan, pretrain = rows
    assert "h200x1: 3.00 of 105.0 GiB (fits), 1.70 GFLOP per image (XLA)" in plan
    assert "step >= 12.50 ms, <= 40,960 images/s (bound, memory)" in plan
    assert "25.0% of the plan's bound (40,960)" in pretrain  # 10,240 measured
    assert "simclr_jax.plan" in fakes["log"].read_text()
    assert "--target=h200x1" in fakes["log"].read_text()  # nvidia-smi named an H200
    assert "`python benchmarks/throughput.py --preset r18_cifar --data device,views" in ours_r18
    assert "device: 3200 images/s, 80 ms/step, 15.62 s/50k images, 2000 GFLOP/step, MFU 0.4" in (
        ours_r18
    )
    assert "views: 3413.3 images/s" in ours_r50 and "aug. share 0.0625" in ours_r50
    # ours(views) / peer = 3413.3 / 2560
    assert "torch_views: 2560 images/s, 100 ms/step; ours(views)/peer 1.33" in peer_r18
    assert "--preset r50 --device cuda" in peer_r50
    assert "--workdir" not in pretrain and "pretrain_fashion_mnist.py:resnet18" in pretrain
    assert "steps 1170, probe top-1 (test) 81.25% at step 1170" in pretrain
    assert "probe accuracy (train batches) 78.12% at step 1170" in pretrain
    assert "images/s 10,240 at step 1100" in pretrain
    assert (tmp_path / "logs1" / "rows.md").read_text().splitlines() == rows
    assert (tmp_path / "logs1" / "pretrain_curves.png").exists()
    assert "pretrain" in first.stdout.split("gpu_suite.sh on NVIDIA H200; jax 0.11.2")[1]

    # Another section follows now; a second run's rows still go into the suite's table. One
    # part fails, the pretraining runs out of time: the others run, its metrics are kept.
    results.write_text(results.read_text() + "\n## CPU\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    env = {**fakes["env"], "FAKE_FAIL": "ours_r50", "FAKE_SLOW_PRETRAIN": "1"}
    fakes["log"].unlink()
    names = ("check_gpu", "check_jax", "check_torch", "ours_r18_cifar", "ours_r50", "plan",
             "pretrain")  # fmt: skip
    limits = [arg for name in names for arg in ("--limit", f"{name}=1")]
    second = suite(*common, "--parts", "throughput,pretrain", *limits,
                   "--log_dir", str(tmp_path / "logs2"), env=env, check=False)  # fmt: skip
    assert second.returncode == 1, second.stdout + second.stderr
    text = results.read_text()
    rows = section_rows(text)
    assert len(rows) == 10 and text.endswith("## CPU\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "| ok (" in rows[6] and "r18_cifar" in rows[6]
    assert "| failed (exit 1) (" in rows[7] and "r50" in rows[7]
    assert "| ok (" in rows[8] and "simclr_jax.plan" in rows[8]
    assert "| timeout after " in rows[9] and "probe top-1 (test) 81.25%" in rows[9]
    summary = (tmp_path / "logs2" / "summary.txt").read_text()
    assert "ours_r50        failed (exit 1)" in summary
    assert "pretrain        timeout after" in summary and "plot            ok" in summary
    calls = fakes["log"].read_text()
    assert calls.count("simclr_jax.plot") == 1 and "peer_torch" not in calls


def test_record_inserts_rows_from_another_machine(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    rows = tmp_path / "rows.md"
    rows.write_text("| 2026-01-01 00:00 UTC | GPU | abc | `x` | 1 | ok (1 s) |\n")
    assert suite("--record", str(rows), "--results", str(results), "--dry-run").stdout.startswith(
        "# would insert"
    )
    assert results.read_text() == "# Benchmark results\n"
    for _ in range(2):
        suite("--record", str(rows), "--results", str(results))
    text = results.read_text()
    assert text.count(SECTION) == 1 and section_rows(text) == 2 * rows.read_text().splitlines()
    assert suite("--record", str(tmp_path / "none.md"), check=False).returncode == 2
