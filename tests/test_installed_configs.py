"""The presets of the top-level configs/ load from a checkout by path, and from an installed wheel
by name alone (`--config=pretrain_imagenet:r50_1x_sk1` from any directory): cli.resolve_config."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from simclr_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKOUT_CONFIGS = sorted(
    p.stem for p in (ROOT / "configs").glob("*.py") if "def get_config(" in p.read_text()
)

# Run with PYTHONPATH=<the wheel's install folder> only, from an empty directory: every preset of
# every installed config, by name, through the flag parsing every command uses.
LOAD_BY_NAME = """
import importlib, json, sys
from absl import flags
from ml_collections import config_flags
import simclr_jax
from simclr_jax import cli

config = config_flags.DEFINE_config_file("config")
cli.parse_flags(["prog", "--config=pretrain_imagenet:r50_1x_sk1"])
r50 = [config.value.model.depth, config.value.model.sk_ratio]
loaded = {}
for name in cli.config_names():
    module = importlib.import_module(f"simclr_jax.configs.{name}")
    for preset in module.ARGUMENTS.presets:
        flags.FLAGS["config"].parse(cli.resolve_config(f"{name}:{preset}"))
        loaded[f"{name}:{preset}"] = config.value.seed
print(json.dumps({"package": simclr_jax.__file__, "configs": cli.config_names(),
                  "r50": r50, "loaded": loaded}))
"""


def load_from_path(name: str):
    """A config file loaded by its path, as ml_collections' --config does."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CHECKOUT_CONFIGS)
def test_every_preset_loads_from_the_checkout_by_path(name):
    module = load_from_path(name)
    assert module.ARGUMENTS.presets, name
    for preset in module.ARGUMENTS.presets:
        assert module.get_config(preset).seed >= 0, preset


def test_a_bare_name_is_the_installed_file_unless_the_directory_has_one(tmp_path, monkeypatch):
    installed = cli.CONFIG_DIR / "pretrain_imagenet.py"
    assert cli.config_names() == CHECKOUT_CONFIGS
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_config("pretrain_imagenet:r50_1x_sk1") == f"{installed}:r50_1x_sk1"
    assert cli.resolve_config("pretrain_imagenet.py:v1") == f"{installed}:v1"
    assert cli.resolve_config("pretrain_imagenet") == str(installed)
    (tmp_path / "pretrain_imagenet.py").write_text("def get_config(arg=None): ...\n")
    assert cli.resolve_config("pretrain_imagenet.py:v1") == "pretrain_imagenet.py:v1"  # the user's
    for missing in ("pretrain_imagnet:v1", "configs/pretrain_imagenet.py:v1", "", "configs"):
        with pytest.raises(ValueError) as error:
            cli.resolve_config(missing)
        assert all(name in str(error.value) for name in CHECKOUT_CONFIGS), error.value


def test_every_preset_loads_by_name_from_an_installed_wheel(tmp_path):
    """A wheel of the project (built as `pip wheel` builds it, from a copy holding only what a
    clone has), installed into a folder of its own; python run from an empty directory."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "configs", source / "configs", ignore=shutil.ignore_patterns("__py*"))
    # simclr_jax/configs is a symlink in some checkouts, absent in a clone: left out.
    skip = shutil.ignore_patterns("__pycache__", "configs")
    shutil.copytree(ROOT / "simclr_jax", source / "simclr_jax", ignore=skip)
    pip = [sys.executable, "-m", "pip", "-q", "--no-input"]
    build = [*pip, "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-w", "dist"]
    subprocess.run([*build, str(source)], cwd=tmp_path, check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("simclr_jax-*.whl")
    install = [*pip, "install", "--no-index", "--no-deps", "--target", str(tmp_path / "site")]
    subprocess.run([*install, str(wheel)], cwd=tmp_path, check=True, timeout=300)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_BY_NAME],
        cwd=empty, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(tmp_path / "site")), found["package"]
    assert found["configs"] == CHECKOUT_CONFIGS
    assert found["r50"] == [50, 0.0625]
    expected = {
        f"{name}:{preset}"
        for name in CHECKOUT_CONFIGS
        for preset in load_from_path(name).ARGUMENTS.presets
    }
    assert set(found["loaded"]) == expected
    assert list(empty.iterdir()) == []  # nothing written where the user stands
