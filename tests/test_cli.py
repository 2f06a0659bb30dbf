"""The stages' command line as a user meets it: help, one-line user errors, tracebacks for bugs,
and logs without orbax's internals (the rules are simclr_jax/cli.py's docstring)."""

from __future__ import annotations

import errno
import logging
import pathlib
import types

import forked_commands
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import cli, losses, validation
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.data import sources

TINY = f"{pretrain_fashion_mnist.__file__}:tiny"


PROGRAM = """
import sys
import numpy as np
from simclr_jax import cli, validation

def main(argv):
    if argv[1] == "ours":
        validation.positive("optim.base_lr", -1.0)
    np.zeros(3).reshape(2)  # a library's ValueError: a bug, not the user's

cli.run(main)
"""


ORBAX_SAVE = """
import logging, sys
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from simclr_jax import cli

def main(argv):
    logging.getLogger().setLevel(logging.INFO)
    with ocp.CheckpointManager(sys.argv[-1]) as manager:
        manager.save(1, args=ocp.args.StandardSave({"w": np.ones(3)}))
    absl_logging.info("our line")
    absl_logging.warning("our warning")

cli.run(main)
"""


USER_ERRORS = {
    "bad argument": (["--config=" + TINY.replace(":tiny", ":size=huge")], "size='huge'"),
    "misspelt field": (
        [f"--config={TINY}", "--config.batch_sise=3"],
        "no such config field 'batch_sise'; Did you mean \"batch_size\"",
    ),
    "no such file": (
        ["--config=no_such_config.py"],
        "--config: no config file 'no_such_config.py'",
    ),
    "no such folder": (
        [
            f"--config={TINY}",
            "--config.dataset.source=folder",
            "--config.dataset.name=folder",
            "--config.dataset.data_dir=/no/such/images",
        ],
        "dataset.data_dir='/no/such/images' is not a folder",
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """This file's command-line runs, side by side in children forked from one interpreter
    (tests/forked_commands.py): name -> (result, the folder it was given)."""
    root = tmp_path_factory.mktemp("cli")
    afile = root / "a_file"
    afile.write_text("keep me")

    def stage(module: str, args: list[str], workdir: pathlib.Path):
        return [module, *args, f"--workdir={workdir}"], workdir

    commands = {
        "help": stage("simclr_jax.pretrain", ["--help"], root / "help"),
        "helpfull": stage("simclr_jax.finetune", ["--helpfull"], root / "helpfull"),
        "a file": stage("simclr_jax.pretrain", [f"--config={TINY}"], afile),
        **{
            name: stage("simclr_jax.pretrain", args, root / f"error_{i}")
            for i, (name, (args, _)) in enumerate(USER_ERRORS.items())
        },
        ("program", "ours", False): (["-c", PROGRAM, "ours"], None),
        ("program", "ours", True): (["-c", PROGRAM, "-v", "1", "ours"], None),
        ("program", "library", False): (["-c", PROGRAM, "library"], None),
        ("orbax", False): (["-c", ORBAX_SAVE, str(root / "orbax")], root / "orbax"),
        ("orbax", True): (["-c", ORBAX_SAVE, "-v", "1", str(root / "orbax_v")], root / "orbax_v"),
    }
    done = forked_commands.run([argv for argv, _ in commands.values()])
    return {
        name: (result, folder)
        for (name, (_, folder)), result in zip(commands.items(), done, strict=True)
    }


def test_help_exits_0_and_lists_the_stage_flags(runs):
    result, _ = runs["help"]
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--config:", "--workdir:", "--stop_at_step:", "--coordinator_address:"):
        assert flag in result.stdout
    assert "python -m simclr_jax.pretrain" in result.stdout  # the stage's docstring
    assert "--jax_" not in result.stdout  # only the stage's own flags (absl's are in --helpfull)


def test_helpfull_exits_0_and_lists_every_flag(runs):
    result, _ = runs["helpfull"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--config:" in result.stdout and "--workdir:" in result.stdout
    assert "--verbosity" in result.stdout  # absl's own flags too


@pytest.mark.parametrize("name", USER_ERRORS)
def test_user_errors_are_one_line_without_a_traceback(name, runs):
    (result, workdir), (_, needle) = runs[name], USER_ERRORS[name]
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("simclr_jax.pretrain: error: ") and needle in last, result.stderr[-2000:]
    assert not (workdir / "checkpoints").exists()


def test_a_workdir_that_is_a_file_is_named_before_any_work(runs):
    result, afile = runs["a file"]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"simclr_jax.pretrain: error: {afile} must be a folder (--workdir names a run's folder, "
        "new or existing), but it is a file"
    )
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("source", ["tfds", "auto", "folder"])
def test_a_missing_data_dir_is_named_before_any_work(source, tmp_path):
    config = pretrain_fashion_mnist.get_config("tiny")
    config.dataset.source = source
    config.dataset.data_dir = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"dataset.data_dir='{tmp_path}/nope' is not a folder"):
        validation.check_dataset(config.dataset)
    config.dataset.data_dir = str(tmp_path)  # an existing folder passes
    validation.check_dataset(config.dataset)
    config.dataset.data_dir = "gs://bucket/tfds"  # left to the reader (no network here)
    validation.check_dataset(config.dataset)


@pytest.mark.parametrize(
    "which,verbose,traceback",
    [("ours", False, False), ("ours", True, True), ("library", False, True)],
)
def test_our_errors_are_one_line_and_bugs_keep_their_traceback(which, verbose, traceback, runs):
    result, _ = runs[("program", which, verbose)]
    assert result.returncode == 1
    assert ("Traceback" in result.stderr) == traceback, result.stderr[-2000:]
    if which == "ours" and not verbose:
        assert result.stderr.strip().splitlines()[-1] == (
            "-c: error: optim.base_lr must be positive, got -1.0"
        )


def test_the_user_error_rule():
    def raised(function, *args):
        try:
            function(*args)
        except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
            return error
        raise AssertionError("nothing raised")

    # Ours, on purpose: a config check. Anywhere: a missing file.
    assert cli.is_user_error(raised(validation.positive, "batch_size", 0))
    assert cli.is_user_error(raised(open, "/no/such/file"))
    # Libraries' ValueErrors through our code, eager and jitted: bugs.
    labels = jnp.zeros((5,), jnp.int32)
    eager = raised(losses.softmax_cross_entropy, jnp.ones((4, 3)), labels)
    jitted = raised(jax.jit(lambda x: losses.l2_normalize(x, axis=5)), jnp.ones((2, 3)))
    for error in (eager, jitted, raised(np.zeros(3).reshape, 2)):
        assert isinstance(error, ValueError) and not cli.is_user_error(error), error
    # A mistake in our own code (not a `raise`), and a KeyError: bugs.
    assert not cli.is_user_error(raised(sources.check_data_dir, None))
    assert not cli.is_user_error(raised(dict().__getitem__, "key"))
    assert cli.one_line(KeyError("'modle'\nDid you mean 'model'?")) == (
        "'modle' Did you mean 'model'?"
    )


def test_help_is_recognised_in_every_absl_spelling():
    for args in (["--help"], ["-?"], ["--helpshort"], ["--helpfull"], ["--helpxml=true"]):
        assert cli.asks_for_help(["--config=x.py", *args]), args
    for args in (["--help=false"], ["--", "--help"], ["--config=help.py"], ["--helper"]):
        assert not cli.asks_for_help(args), args


@pytest.mark.parametrize("verbose", [False, True])
def test_orbax_internals_leave_the_log_unless_verbose(verbose, runs):
    result, folder = runs[("orbax", verbose)]
    assert result.returncode == 0, result.stderr[-2000:]
    assert (folder / "1").is_dir()
    assert "our line" in result.stderr and "our warning" in result.stderr
    orbax_info = [
        line
        for line in result.stderr.splitlines()
        if line.startswith("I") and any(f in line for f in ("checkpoint_manager.py", "atomicity"))
    ]
    assert bool(orbax_info) == verbose, result.stderr[-3000:]


def test_orbax_abandoned_work_is_not_reported_but_other_unraisables_are(tmp_path):
    """What the garbage collector finds of orbax's abandoned reads and writes after a handled
    error (a corrupt checkpoint set aside, a failed save) is dropped; anything else is reported."""
    import orbax.checkpoint as ocp

    def raised(function) -> BaseException:
        try:
            function()
        except Exception as error:  # noqa: BLE001 - any exception, with its traceback
            return error
        raise AssertionError("nothing raised")

    in_orbax = raised(lambda: ocp.StandardCheckpointer().restore(tmp_path / "nothing"))
    ours = raised(lambda: validation.positive("batch_size", 0))
    reported = []
    hook = cli._without_orbax_unraisable(reported.append)
    for error in (in_orbax, RuntimeError("Event loop is closed"), ours, KeyError("x")):
        hook(types.SimpleNamespace(exc_value=error, object=None))
    assert [u.exc_value for u in reported][:1] == [ours] and len(reported) == 2


def test_the_library_filter_keeps_warnings_and_other_libraries():
    def record(path: str, level: int, message: str = "message", error=None) -> logging.LogRecord:
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord("absl", level, path, 1, message, (), exc_info)

    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not cli._drop_library_notices(record(orbax, logging.INFO))
    assert cli._drop_library_notices(record(orbax, logging.WARNING))
    assert cli._drop_library_notices(record("/work/simclr_jax/train/loop.py", logging.INFO))
    # orbax's errors stay, except its reports of a full disk (the run ends saying so itself).
    full = OSError(errno.ENOSPC, "No space left on device")
    assert cli._drop_library_notices(record(orbax, logging.ERROR, error=ValueError("bad")))
    assert not cli._drop_library_notices(record(orbax, logging.ERROR, "failed", error=full))
    wrapped = "RESOURCE_EXHAUSTED: Failed to write: No space left on device [os_error_code='28']"
    assert not cli._drop_library_notices(record(orbax, logging.ERROR, wrapped))
    loop = "/work/simclr_jax/train/loop.py"
    assert cli._drop_library_notices(record(loop, logging.ERROR, wrapped, error=full))


def test_readme_names_the_students_fields():
    """The distillation config has no config.model: its student is config.student.model."""
    from simclr_jax.configs import distill_fashion_mnist

    config = distill_fashion_mnist.get_config()
    assert "model" not in config and "depth" in config.student.model
    readme = (pathlib.Path(cli.__file__).parents[1] / "README.md").read_text()
    distillation = readme[readme.index("- **Distillation**") :].split("\n- **")[0]
    assert "`config.student.model.*`" in distillation and "`config.model.*`" not in distillation
