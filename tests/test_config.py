"""Config files: every preset loads, overrides round-trip, mistakes are errors that name the field."""

import json
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

PRESETS = {
    "pretrain_fashion_mnist.py": ["", "demo", "resnet18", "tiny"],
    "pretrain_cifar10.py": ["", "reference", "small_batch"],
    "pretrain_imagenet.py": ["", "v1", "r50_1x_sk0", "r50_1x_sk1", "r101_2x_sk1", "r152_3x_sk1"],
}


def parse(argv):
    """Parse `--config=...` overrides with a fresh flag registry, as an entry point would."""
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=registry, lock_config=True
    )
    registry(["prog", *argv])
    return registry.config


@pytest.mark.parametrize("file,preset", [(f, p) for f, presets in PRESETS.items() for p in presets])
def test_every_preset_loads(file, preset):
    spec = f"{CONFIGS / file}:{preset}" if preset else str(CONFIGS / file)
    config = parse([f"--config={spec}"])
    assert config.batch_size > 0 and config.optim.base_lr > 0
    assert config.model.depth in (18, 34, 50, 101, 152, 200)


def test_reference_recipes():
    cifar = parse([f"--config={CONFIGS / 'pretrain_cifar10.py'}"])
    assert (cifar.batch_size, cifar.optim.base_lr, cifar.optim.lr_scaling) == (512, 1.0, "linear")
    assert (cifar.loss.temperature, cifar.augment.color_jitter_strength) == (0.5, 0.5)
    assert not cifar.augment.use_blur and cifar.num_epochs == 1000
    # The reference CIFAR command keeps run.py's default head: 3 layers to 128 dims.
    head = (cifar.model.depth, cifar.model.num_proj_layers, cifar.model.proj_out_dim)
    assert head == (18, 3, 128)
    small = parse([f"--config={CONFIGS / 'pretrain_cifar10.py'}:small_batch"])
    assert (small.optim.lr_scaling, small.model.num_proj_layers, small.model.proj_out_dim) == (
        "sqrt",
        2,
        64,
    )
    v2 = parse([f"--config={CONFIGS / 'pretrain_imagenet.py'}:r152_3x_sk1"])
    assert (v2.model.depth, v2.model.width_multiplier, v2.model.sk_ratio) == (152, 3, 0.0625)
    assert v2.model.num_proj_layers == 3
    v1 = parse([f"--config={CONFIGS / 'pretrain_imagenet.py'}"])
    assert (v1.batch_size, v1.optim.base_lr, v1.loss.temperature, v1.num_epochs) == (
        4096,
        0.3,
        0.1,
        100,
    )


CLI = """
import json
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "c", lock_config=True)
app.run(lambda _: print(json.dumps(flags.FLAGS.config.to_dict())))
"""


def run_cli(*argv):
    """Parse overrides exactly as the entry points do (absl app + config_flags) in a subprocess."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            f"--config={CONFIGS / 'pretrain_fashion_mnist.py'}:tiny",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_override_round_trip():
    result = run_cli(
        "--config.batch_size=64",
        "--config.model.cifar_stem=False",
        "--config.optim.name=momentum",
        "--config.loss.temperature=0.7",
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert config["batch_size"] == 64
    assert config["model"]["cifar_stem"] is False
    assert config["optim"]["name"] == "momentum"
    assert config["loss"]["temperature"] == 0.7


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.modle.depth=50", "modle"),
        ("--config.batch_sise=64", "batch_sise"),
        ("--config.batch_size=big", "batch_size"),
        ("--config.model.depth=1.5", "depth"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    result = run_cli(override)
    assert result.returncode != 0
    assert needle in result.stderr


def test_unknown_preset_is_an_error():
    with pytest.raises((flags.Error, ValueError), match="unknown preset"):
        parse([f"--config={CONFIGS / 'pretrain_imagenet.py'}:r9_9x_sk9"])


def test_every_field_is_documented():
    """Each field assignment in the base builders carries a comment (inline or the line above)."""
    source = (CONFIGS.parent / "simclr_jax" / "config.py").read_text().splitlines()
    for number, line in enumerate(source):
        stripped = line.strip()
        if stripped.startswith("c.") and " = " in stripped and "ConfigDict()" not in stripped:
            if "_config()" in stripped:
                continue
            documented = "#" in line or source[number - 1].strip().startswith("#")
            assert documented, f"config.py:{number + 1} has no comment: {stripped}"
