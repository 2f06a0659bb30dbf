"""Every command of the package, as `python -m simclr_jax` lists it: the list is complete, each
command's `--help` exits 0, and each refuses an unknown flag the same way (exit status 1, one
line `<command>: error: ...`: absl flags through simclr_jax.cli.run)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import forked_commands

from simclr_jax.__main__ import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "simclr_jax"


def modules_with_a_main() -> set[str]:
    """simclr_jax's modules that run as programs: a `__main__` guard, or a package's __main__.py."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] == "configs":
            continue
        if path.name == "__main__.py":
            found.add(".".join(parts[:-1]))
        elif re.search(r"^if __name__ == .__main__.:", path.read_text(), re.M):
            found.add(".".join(parts))
    return found - {""}  # simclr_jax/__main__.py: the listing itself


def run_all(*arguments: str, modules) -> list[dict[str, subprocess.CompletedProcess]]:
    """`python -m <module> <argument>` for every module and argument, side by side: run as
    `python -m` runs them, in children forked from one interpreter (tests/forked_commands.py)."""
    results = iter(forked_commands.run([[m, a] for a in arguments for m in modules], cwd=ROOT))
    return [{module: next(results) for module in modules} for _ in arguments]


def test_the_listing_names_every_command():
    assert set(COMMANDS) == modules_with_a_main()
    result = subprocess.run(
        [sys.executable, "-m", "simclr_jax"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == list(COMMANDS)  # one line each


def test_every_command_helps_and_refuses_an_unknown_flag_alike():
    modules = ["simclr_jax"] + [f"simclr_jax.{name}" for name in COMMANDS]
    helped, refused = run_all("--help", "--no_such_flag=1", modules=modules)
    for module, result in helped.items():
        assert result.returncode == 0, (module, result.stderr[-2000:])
        assert "--help" in result.stdout or "usage" in result.stdout.lower(), module
    # A stage's help lists the presets of its configs (absl wraps the lines).
    text = {module: " ".join(result.stdout.split()) for module, result in helped.items()}
    assert "pretrain_imagenet: v1, r50_1x_sk0, r50_1x_sk1," in text["simclr_jax.pretrain"]
    assert "finetune_fashion_mnist: linear_eval, 1pct," in text["simclr_jax.finetune"]
    assert "distill_fashion_mnist: self, big_to_small," in text["simclr_jax.distill"]
    assert "pretrain_imagenet" not in text["simclr_jax.finetune"]

    for module, result in refused.items():
        assert result.returncode == 1, (module, result.returncode, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{module}: error: ") and "no_such_flag" in last, (module, last)
        assert "Traceback" not in result.stderr, module
