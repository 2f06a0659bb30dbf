"""Config files: the package imports, every preset loads and equals its composed arguments,
overrides round-trip, mistakes are one-line errors that name the field, key or value."""

import importlib
import json
import pathlib
import pkgutil
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from simclr_jax import configs

CONFIGS = pathlib.Path(configs.__file__).parent
# The config files (every module of the package but the argument parser, the base builders and
# the shared recipes), found, not listed, so a new one is tested too; the list below is what the
# README documents.
NAMES = sorted(
    m.name
    for m in pkgutil.iter_modules(configs.__path__)
    if m.name not in ("arguments", "base", "recipes")
)
DOCUMENTED = [
    "distill_fashion_mnist", "finetune_cifar10", "finetune_fashion_mnist", "finetune_imagenet",
    "pretrain_cifar10",
    "pretrain_fashion_mnist", "pretrain_imagenet", "transfer_digits",
]  # fmt: skip
# The default preset of each file, as its docstring names it.
DEFAULT_PRESET = {
    "distill_fashion_mnist": "self", "finetune_cifar10": "linear_eval",
    "finetune_fashion_mnist": "linear_eval",
    "finetune_imagenet": "linear_eval", "pretrain_cifar10": "reference",
    "pretrain_fashion_mnist": "demo", "pretrain_imagenet": "v1", "transfer_digits": "linear_eval",
}  # fmt: skip


def module(name: str):
    return importlib.import_module(f"simclr_jax.configs.{name}")


PRESETS = [(name, p) for name in NAMES for p in ["", *module(name).ARGUMENTS.presets]]


def parse(argv):
    """Parse `--config=...` overrides with a fresh flag registry, as an entry point would."""
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=registry, lock_config=True
    )
    registry(["prog", *argv])
    return registry.config


@pytest.mark.parametrize("name,preset", PRESETS)
def test_every_preset_loads(name, preset):
    spec = f"{CONFIGS / name}.py:{preset}" if preset else f"{CONFIGS / name}.py"
    config = parse([f"--config={spec}"])
    assert config.batch_size > 0 and config.optim.base_lr > 0
    model = config.student.model if "student" in config else config.model
    if model.backbone == "convnet":  # the demo's CPU-shaped network: depth counts its convs
        assert model.depth >= 4
    else:
        assert model.depth in (None, 18, 34, 50, 101, 152, 200)  # None: the checkpoint's


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
    assert v2.model.num_proj_layers == 3 and v2.augment.brightness == "multiplicative"
    v1 = parse([f"--config={CONFIGS / 'pretrain_imagenet.py'}"])
    assert (v1.batch_size, v1.optim.base_lr, v1.loss.temperature, v1.num_epochs) == (
        4096,
        0.3,
        0.1,
        100,
    )
    assert v1.augment.brightness == "additive"  # SimCLR v1's brightness


# The reference's step counts (google-research/simclr tf2/model.py): get_train_steps gives
# total = N * epochs // B + 1; WarmUpAndCosineDecay gives warmup = int(round(warmup_epochs * N // B)).
# N is the training split (or labelled subset) of each preset's dataset, from the tfds catalogue:
# Fashion-MNIST 60,000 (1%: 600, 10%: 6,000 class-stratified), CIFAR-10 50,000, ImageNet
# 1,281,167, imagenet2012_subset 1pct 12,811 and 10pct 128,116. Totals and warmups worked out
# by hand from the presets' documented batch sizes and epochs.
PRESET_STEPS = [
    # file, preset, N, B, epochs, warmup epochs, total steps, warmup steps
    ("pretrain_fashion_mnist", "demo", 60_000, 256, 6.5, 1, 1_524, 234),
    ("pretrain_fashion_mnist", "resnet18", 60_000, 512, 200, 10, 23_438, 1_171),
    ("finetune_fashion_mnist", "demo_1pct", 600, 60, 60, 0, 601, 0),
    ("finetune_fashion_mnist", "linear_eval", 60_000, 512, 100, 0, 11_719, 0),
    ("finetune_fashion_mnist", "1pct", 600, 64, 60, 0, 563, 0),
    ("finetune_fashion_mnist", "10pct", 6_000, 256, 30, 0, 704, 0),
    ("distill_fashion_mnist", "self", 60_000, 256, 30, 1, 7_032, 234),
    ("pretrain_cifar10", "reference", 50_000, 512, 1000, 10, 97_657, 976),
    ("pretrain_cifar10", "small_batch", 50_000, 256, 1000, 10, 195_313, 1_953),
    ("pretrain_imagenet", "v1", 1_281_167, 4096, 100, 10, 31_279, 3_127),
    ("pretrain_imagenet", "r50_1x_sk0", 1_281_167, 4096, 800, 10, 250_228, 3_127),
    ("finetune_imagenet", "linear_eval", 1_281_167, 4096, 90, 0, 28_151, 0),
    ("finetune_imagenet", "1pct", 12_811, 1024, 60, 0, 751, 0),
    ("finetune_imagenet", "10pct", 128_116, 1024, 30, 0, 3_754, 0),
]


@pytest.mark.parametrize("name,preset,n,batch,epochs,warmup,total_steps,warmup_steps", PRESET_STEPS)
def test_preset_step_counts_are_the_reference_formula(
    name, preset, n, batch, epochs, warmup, total_steps, warmup_steps
):
    from simclr_jax import optim

    config = module(name).get_config(preset)
    # The row describes the preset (so the hand-worked counts are about this config) ...
    assert (config.batch_size, config.num_epochs, config.optim.warmup_epochs) == (
        batch,
        epochs,
        warmup,
    )
    assert config.num_steps == 0  # counted from epochs, not overridden
    # ... and the hand-worked counts are the reference formula ...
    assert total_steps == n * epochs // batch + 1
    assert warmup_steps == int(round(warmup * n // batch))
    # ... which is what a run of the preset gets.
    schedule = optim.train_schedule(config, n)
    assert (schedule.total_steps, schedule.warmup_steps) == (total_steps, warmup_steps)


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
            f"--config={CONFIGS / 'pretrain_fashion_mnist.py'}:size=tiny",
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
    with pytest.raises((flags.Error, ValueError), match="'r9_9x_sk9' .* is neither a preset"):
        parse([f"--config={CONFIGS / 'pretrain_imagenet.py'}:r9_9x_sk9"])


def test_every_field_is_documented():
    """Each field assignment in the base builders carries a comment (inline or the line above)."""
    source = (CONFIGS / "base.py").read_text().splitlines()
    for number, line in enumerate(source):
        stripped = line.strip()
        if stripped.startswith("c.") and " = " in stripped and "ConfigDict()" not in stripped:
            if "_config()" in stripped:
                continue
            documented = "#" in line or source[number - 1].strip().startswith("#")
            assert documented, f"base.py:{number + 1} has no comment: {stripped}"


# ------------------------------------------------------------------- the package and its arguments


def test_the_config_files_are_the_documented_ones():
    assert NAMES == DOCUMENTED


def test_every_config_imports_as_a_module_from_anywhere(tmp_path):
    """No sys.path or importlib tricks: a fresh interpreter in an unrelated folder imports each."""
    script = (
        "import importlib, sys; "
        f"mods = [importlib.import_module('simclr_jax.configs.' + n) for n in {NAMES!r}]; "
        "print(sum(m.get_config().batch_size > 0 for m in mods))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == str(len(NAMES))


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_equals_its_composed_form(name):
    """Each preset name is an alias: the same config as its key=value string, in any key order."""
    config_module = module(name)
    presets = config_module.ARGUMENTS.presets
    assert DEFAULT_PRESET[name] in presets
    for preset, expansion in presets.items():
        composed = config_module.get_config(expansion).to_dict()
        assert config_module.get_config(preset).to_dict() == composed, preset
        reordered = ",".join(reversed(expansion.split(",")))
        assert config_module.get_config(reordered).to_dict() == composed, preset
    no_argument = config_module.get_config().to_dict()
    assert no_argument == config_module.get_config(DEFAULT_PRESET[name]).to_dict()


def test_composed_arguments_follow_the_documented_rules():
    from simclr_jax.configs import finetune_fashion_mnist as ft
    from simclr_jax.configs import pretrain_imagenet

    # Read left to right: a preset, then a change, is that preset at another size.
    assert ft.get_config("1pct,size=tiny").to_dict() == ft.get_config("tiny").to_dict()
    assert ft.get_config("size=tiny,size=demo").to_dict() == ft.get_config("size=demo").to_dict()
    # A fraction no preset has: the semi recipe's rule, batch 64 and 60 epochs below 10%.
    five = ft.get_config("recipe=semi,fraction=0.05")
    assert (five.label_fraction, five.batch_size, five.num_epochs) == (0.05, 64, 60.0)
    assert (five.model.ft_proj_selector, five.optim.name) == (1, "lars")
    # At the demo size, about 600 steps at any fraction: batch 256 from 10% of the labels.
    half = ft.get_config("recipe=supervised,fraction=0.5,size=demo")
    assert (half.label_fraction, half.batch_size, half.init_checkpoint) == (0.5, 256, "none")
    assert round(half.num_epochs * 30_000 / 256) == 600
    # The demo pretraining's network, from scratch.
    assert (half.model.backbone, half.model.base_width) == ("convnet", 32)
    # The v1 recipe on another ResNet, which no preset names.
    r101 = pretrain_imagenet.get_config("version=1,depth=101,sk=1")
    assert (r101.model.depth, r101.model.sk_ratio, r101.optim.base_lr) == (101, 0.0625, 0.3)


@pytest.mark.parametrize(
    "name,arg,needles",
    [
        ("finetune_fashion_mnist", "recipe=semi,fractoin=0.01", ["unknown key 'fractoin'"]),
        ("finetune_fashion_mnist", "recipe=semi,fraction=lots", ["fraction='lots'", "float"]),
        ("finetune_fashion_mnist", "recipe=sem", ["recipe='sem'", "linear_eval|semi|supervised"]),
        ("finetune_fashion_mnist", "1pcnt", ["'1pcnt'", "neither a preset", "1pct"]),
        ("pretrain_imagenet", "depth=fifty", ["depth='fifty'", "int"]),
        ("pretrain_imagenet", "version=3", ["version='3'", "1|2"]),
        ("pretrain_fashion_mnist", "size=huge", ["size='huge'", "full|demo|tiny"]),
        ("finetune_imagenet", "recipe=semi,fraction=1.0", ["recipe=semi takes fraction=0.01"]),
    ],
)
def test_bad_arguments_fail_in_one_line_naming_them(name, arg, needles):
    with pytest.raises(ValueError) as error:
        module(name).get_config(arg)
    message = str(error.value)
    assert "\n" not in message and message.startswith(name)
    for needle in needles:
        assert needle in message


def test_values_are_typed_by_their_default():
    from simclr_jax.configs.arguments import Arguments

    arguments = Arguments("x", {"n": 1, "rate": 0.5, "flag": False, "name": "a"})
    parsed = arguments.parse(" n=3, rate=1,flag=yes,name=b ")
    assert (parsed.n, parsed.rate, parsed.flag, parsed.name) == (3, 1.0, True, "b")
    assert type(parsed.rate) is float and arguments.parse("flag=False").flag is False
    assert arguments.parse(None).to_dict() == arguments.parse("").to_dict() == arguments.defaults
    for bad, needle in [
        ("n=2.5", "type int"),
        ("flag=maybe", "type bool"),
        ("rate=x", "type float"),
    ]:
        with pytest.raises(ValueError, match=needle):
            arguments.parse(bad)


def test_a_bad_preset_table_fails_at_import():
    from simclr_jax.configs.arguments import Arguments

    with pytest.raises(ValueError, match="unknown key 'sise'"):
        Arguments("x", {"size": "full"}, presets={"tiny": "sise=tiny"})
    with pytest.raises(ValueError, match="must be key=value items"):
        Arguments("x", {"size": "full"}, presets={"both": "tiny,size=full"})


CLI_ALL = """
import json, sys
from absl import app, flags
from ml_collections import config_flags
names = sys.argv.pop(1).split(",")
for n in names:
    config_flags.DEFINE_config_file(n, None, n, lock_config=True)
app.run(lambda _: print(json.dumps({n: flags.FLAGS[n].value.to_dict() for n in names})))
"""


def test_every_config_file_loads_through_config_flags_from_the_command_line():
    """One absl program, one --NAME=FILE:ARG flag per config file, composed arguments included."""
    args = {name: DEFAULT_PRESET[name] for name in NAMES}
    args["finetune_fashion_mnist"] = "recipe=semi,fraction=0.01,size=tiny"
    args["pretrain_imagenet"] = "r152_3x_sk1"
    argv = [f"--{name}={CONFIGS / name}.py:{arg}" for name, arg in args.items()]
    argv.append("--finetune_fashion_mnist.batch_size=24")  # an override after a composed argument
    result = subprocess.run(
        [sys.executable, "-c", CLI_ALL, ",".join(NAMES), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name, arg in args.items():
        expected = module(name).get_config(arg).to_dict()
        if name == "finetune_fashion_mnist":
            assert loaded[name]["batch_size"] == 24
            expected["batch_size"] = 24
        assert loaded[name] == json.loads(json.dumps(expected)), name


def readme_config_commands() -> list[list[str]]:
    """The --config and --config.* arguments of each command in the README's code blocks."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = "\n".join(readme.split("```")[1::2]).replace("\\\n", " ")
    commands = []
    for line in blocks.splitlines():
        args = [arg[arg.index("--config") :] for arg in line.split() if "--config" in arg]
        if args and args[0].startswith("--config=") and ".py" in args[0]:
            commands.append(args)
    return commands


def test_every_readme_command_loads_its_config_and_overrides():
    """As written: the file exists, the argument parses, every overridden field exists."""
    commands = readme_config_commands()
    assert len(commands) >= 10
    root = CONFIGS.parent
    for args in commands:
        path = args[0].removeprefix("--config=")
        argv = ["prog", f"--config={root / path}", *args[1:]]
        registry = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=registry, lock_config=True)
        saved, sys.argv = sys.argv, argv  # config_flags reads overrides from sys.argv
        try:
            registry(argv)
        finally:
            sys.argv = saved
        assert registry.config.batch_size > 0, args
