"""The command line every stage shares: `python -m simclr_jax.<stage> --config=... --workdir=...`.

Flags are defined only when a stage runs as a program, so the stages stay importable side by side.
They count as the stage's own flags, so `--help` lists them (`--helpfull` adds absl's and JAX's);
asking for help is a success (exit 0; absl exits 1).

Errors, the rule. A mistake the user can fix prints one line, `<program>: error: <message>`, and
exits with status 1; anything else is a bug and keeps its traceback. The user's mistakes are:
  - the command line: an unknown flag or config field, a value of the wrong type, a bad config file
    argument (what absl and ml_collections reject while parsing flags);
  - what simclr_jax rejects on purpose: a ValueError, RuntimeError, ImportError or OSError raised by
    a `raise` statement in this package (the config checks, a missing or mismatched checkpoint, a
    locked workdir, a dataset that is not prepared, a missing extra);
  - the environment: any OSError (a missing file or folder, no permission, a full disk).
An exception that a library raises (JAX, Flax, orbax, NumPy; a ValueError included) is a bug and
keeps its traceback, as does an exception our code raises without meaning to (a KeyError, a
TypeError, a failed assert). `--verbosity=1` (or `-v 1`) shows the traceback of user errors too.

Configs: `--config` takes a config file's path (`configs/pretrain_imagenet.py:r50_1x_sk1` from a
checkout) or, with no '/' and no such file in the current directory, the name of a config
installed with the package (`pretrain_imagenet:r50_1x_sk1`, after a plain `pip install`):
resolve_config does it, for every config-file flag of every command. A stage's `--help` lists the
installed configs of that stage with their presets; a config file that does not exist is one line
listing the installed ones.

Results: a stage prints its results as a small table (results_table), not a Python dict.

Logs: libraries the user did not ask for stay quiet. Before TensorFlow or matplotlib is imported
(both only ever lazily, after this module), TF's C++ INFO lines (CPU feature banner) and its oneDNN
notice are switched off by their environment variables, unless already set (oneDNN's switch
changes no byte of what our TF code computes: decode, crops, bicubic resizes; checked), and
matplotlib's one-off "building the font cache" line is dropped. (TF_ENABLE_ONEDNN_OPTS does not
reach JAX: the demo's training and features are bit for bit the same with it on or off.) Orbax
writes about 40 INFO lines per checkpoint about its own machinery, and JAX one about the TPU
backend it did not find; unless --verbosity >= 1 these are dropped. Their warnings and errors,
and every other line, stay, except orbax's errors about a full disk: one per write thread, each
with its traceback, while the run ends with one line naming the cause. Orbax logs through absl's
one logger, so there is no orbax logger to give a level: a filter on that logger drops its
records by their source file.
"""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from simclr_jax import configs, distributed, exception_chain
from simclr_jax.configs import base as config_base
from simclr_jax.train import disk_space, workdir_lock

# The flags this module defines belong to the stage that calls it (its key flags, for --help).
flags.disclaim_key_flags()

HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")
USER_ERRORS = (ValueError, RuntimeError, ImportError, OSError)  # when simclr_jax raises them
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_ORBAX = f"{os.sep}orbax{os.sep}"
CONFIG_DIR = pathlib.Path(configs.__file__).parent  # configs/ of a checkout, or installed
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "1",  # TF's C++ INFO lines: the CPU feature banner
    "TF_ENABLE_ONEDNN_OPTS": "0",  # TF's oneDNN notice (our TF ops give the same bytes either way)
}
_MATPLOTLIB_NOTICES = ("building the font cache",)


def quiet_library_banners() -> None:
    """The switches of the module docstring's "Logs" (environment values already set are kept)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    fonts = logging.getLogger("matplotlib.font_manager")
    fonts.addFilter(lambda record: not any(n in str(record.msg) for n in _MATPLOTLIB_NOTICES))


quiet_library_banners()  # now: entry points import matplotlib or TensorFlow only after this module


def config_names() -> list[str]:
    """The config files installed with simclr_jax (a checkout's configs/), by name."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if "def get_config(" in p.read_text())


def resolve_config(value: str) -> str:
    """A --config value, with an installed config named without a path made its file's path.

    `pretrain_imagenet:r50_1x_sk1` (or `pretrain_imagenet.py:...`), when no such file is in the
    current directory, becomes `<installed simclr_jax/configs>/pretrain_imagenet.py:r50_1x_sk1`;
    an existing file's path is kept. A config file that does not exist is a ValueError of one
    line that lists the installed configs.
    """
    path, colon, argument = value.partition(":")
    if os.path.isfile(path):
        return value
    name = path.removesuffix(".py")
    if "/" not in path and os.sep not in path and name in config_names():
        return f"{CONFIG_DIR / name}.py{colon}{argument}"
    raise ValueError(
        f"no config file {path!r}: give a config file's path, or an installed config by name "
        f"({', '.join(config_names())}), e.g. pretrain_fashion_mnist:demo"
    )


def config_help(what: str, stage: str | None = None) -> str:
    """A config flag's help: the forms it takes and the installed configs (those of `stage`:
    'pretrain', 'finetune' or 'distill'), each with its presets."""
    lines = [
        f"{what}: a config file's path or an installed config's name, then ':' and its argument "
        "(a preset, or key=value,...), e.g. configs/pretrain_fashion_mnist.py:demo (a checkout) "
        "or pretrain_fashion_mnist:demo (anywhere). Installed configs and their presets:"
    ]
    for name in config_names():
        module = importlib.import_module(f"{configs.__name__}.{name}")
        if stage is not None and config_base.stage_of(module.get_config()) != stage:
            continue
        arguments = getattr(module, "ARGUMENTS", None)
        presets = ", ".join(arguments.presets) if arguments and arguments.presets else "none"
        lines.append(f"{name}: {presets}")
    return "\n".join(lines)


def results_table(results: Mapping[str, Any]) -> str:
    """A run's results as a two-column table (floats to 4 decimals), for the terminal."""
    rows = [(name, f"{v:.4f}" if isinstance(v, float) else str(v)) for name, v in results.items()]
    width = max([len("result")] + [len(name) for name, _ in rows])
    value_width = max([len("value")] + [len(value) for _, value in rows])
    lines = [f"| {'result':<{width}} | {'value':>{value_width}} |"]
    lines.append(f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|")
    lines += [f"| {name:<{width}} | {value:>{value_width}} |" for name, value in rows]
    return "\n".join(lines)


def run_stage(train_and_evaluate: Callable[..., dict[str, Any]], what: str) -> None:
    """Define the common flags, join a multi-process job if one is described, run, print results."""
    module = train_and_evaluate.__module__  # simclr_jax.<stage>, or __main__ when run with -m
    stage = (_program() if module == "__main__" else module).rpartition(".")[2]
    config_flags.DEFINE_config_file(
        "config", None, config_help(f"{what} config", stage), lock_config=True
    )
    flags.declare_key_flag("config")  # defined by ml_collections; listed as this stage's
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")
    flags.DEFINE_integer("stop_at_step", None, "End this run at this step (rerun to resume).")
    flags.DEFINE_bool(
        "accept_config_changes",
        False,
        "Resume a workdir although the config changes the run (recorded in config_history.jsonl).",
    )

    def job(values: flags.FlagValues) -> dict[str, Any]:
        workdir_lock.check_folder(values.workdir)  # before any work
        return train_and_evaluate(
            values.config,
            values.workdir,
            stop_at_step=values.stop_at_step,
            accept_config_changes=values.accept_config_changes,
        )

    run_job(job, required=("config", "workdir"))


def run_job(job: Callable[[flags.FlagValues], Mapping[str, Any]], *, required: Sequence[str]):
    """A command that may run as one process of a multi-process job: the distributed flags,
    `required` flags, logs at INFO, the processes joined, then `job(flags)`'s results printed
    as a table (run_stage's and the evaluation job's command lines)."""
    distributed.define_flags()
    flags.adopt_module_key_flags(distributed)
    flags.mark_flags_as_required(list(required))

    def main(argv: list[str]) -> None:
        del argv
        logging.getLogger().setLevel(logging.INFO)
        distributed.initialize()
        print(results_table(job(flags.FLAGS)))

    run(main)


def run(main: Callable[[list[str]], Any]) -> None:
    """absl's app.run(main), with this module's rules for help, errors and logs (docstring)."""

    def guarded(argv: list[str]) -> Any:
        if not _verbose():
            logging.getLogger("absl").addFilter(_drop_library_notices)
            # "Unable to initialize backend 'tpu'" on every machine without one (INFO).
            logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
            sys.unraisablehook = _without_orbax_unraisable(sys.unraisablehook)
        try:
            return main(argv)
        except Exception as error:
            if _verbose() or not is_user_error(error):
                raise
            _fail(one_line(error))

    app.run(guarded, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, but help exits 0, a rejected flag is one line (no traceback), and
    config files may be named (resolve_config)."""
    try:
        argv = resolve_config_flags(argv)
    except ValueError as error:
        _fail(f"{one_line(error)} (see --help)")
    try:
        return flags.FLAGS(list(argv))
    except SystemExit as stop:
        if stop.code and asks_for_help(argv[1:]):
            raise SystemExit(0) from None
        raise
    except (flags.Error, KeyError, AttributeError, ValueError) as error:
        root = exception_chain.root_cause(error)
        if _verbose() or not isinstance(root, ValueError | KeyError | OSError | flags.Error):
            raise  # a config file's own bug (a TypeError, a NameError, ...) keeps its traceback
        _fail(f"{_flag_message(error, root)} (see --help)")


def resolve_config_flags(argv: Sequence[str]) -> list[str]:
    """argv with the value of every config-file flag (--config=V or --config V) resolved."""
    file_parser = config_flags.config_flags.ConfigFileFlagParser
    names = {name for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, file_parser)}
    argv = list(argv)
    position = 1
    while position < len(argv) and argv[position] != "--":
        name, equals, value = argv[position].lstrip("-").partition("=")
        if argv[position].startswith("-") and name in names:
            try:
                if equals:
                    argv[position] = f"--{name}={resolve_config(value)}"
                elif position + 1 < len(argv):
                    position += 1
                    argv[position] = resolve_config(argv[position])
            except ValueError as error:
                raise ValueError(f"--{name}: {error}") from None
        position += 1
    return argv


def asks_for_help(args: Sequence[str]) -> bool:
    """Whether the arguments (program name excluded) ask for absl's help."""
    for arg in args:
        if arg == "--":
            return False
        name, _, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in HELP_FLAGS and value.lower() not in ("false", "0"):
            return True
    return False


def is_user_error(error: BaseException) -> bool:
    """The rule of the module docstring: an OSError, or one of USER_ERRORS raised on purpose by
    simclr_jax (the innermost frame is a `raise` statement in this package)."""
    if isinstance(error, OSError):
        return True
    if not isinstance(error, USER_ERRORS):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    where = frames[-1]
    return where.filename.startswith(_PACKAGE) and (where.line or "").startswith("raise")


def one_line(error: BaseException) -> str:
    """The error's message with its lines joined (a KeyError's message without repr quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


def _flag_message(error: BaseException, root: BaseException) -> str:
    """absl's one-line message, or, when it carries a config file's traceback, the root cause's."""
    unknown = next((e for e in exception_chain.chain(error) if isinstance(e, KeyError)), None)
    if unknown is not None:  # ml_collections: an override of a field that does not exist
        name, *suggestion = str(unknown.args[0] if unknown.args else unknown).splitlines()
        return f"no such config field {name}" + "".join(f"; {line}" for line in suggestion)
    return one_line(root if "\n" in str(error) and root is not error else error)


# Orbax warnings that only describe what was asked for (reading a workdir read-only).
_ORBAX_NOTICES = ("Given directory is read only",)


def _drop_library_notices(record: logging.LogRecord) -> bool:
    """Keep a log record unless it is orbax's, below WARNING or one of its notices, or its report
    of a full disk (each of its write threads logs one with a traceback; the run then ends with
    one line saying so, train/disk_space.py)."""
    if _ORBAX not in record.pathname:
        return True
    if record.levelno >= logging.ERROR:
        error = record.exc_info[1] if record.exc_info else None
        return not (disk_space.is_disk_full(error) or disk_space.NO_SPACE in record.getMessage())
    notice = any(text in str(record.msg) for text in _ORBAX_NOTICES)
    return record.levelno >= logging.WARNING and not notice


def _without_orbax_unraisable(hook: Callable) -> Callable:
    """sys.unraisablehook, less what orbax's abandoned work reports when the garbage collector
    finds it: the "Event loop is closed" of checkpoint writes in flight when a save failed, and
    the reads still pending when one read of a corrupt checkpoint failed (an "Exception ignored
    in: <coroutine ...>" each, with TensorStore's whole spec). The run's own line says what
    happened (the save's error, or the checkpoint set aside); --verbosity=1 shows them all."""

    def unraisablehook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if _raised_in_orbax(value):
            return
        hook(unraisable)

    return unraisablehook


def _raised_in_orbax(error: BaseException | None) -> bool:
    """Whether `error` was raised by a frame of orbax's own code."""
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return bool(frames) and f"{os.sep}orbax{os.sep}" in frames[-1].filename


def _verbose() -> bool:
    try:
        return flags.FLAGS["verbosity"].value >= 1
    except (KeyError, flags.Error):
        return False


def _program() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None:
        return os.path.basename(sys.argv[0])
    return spec.name.removesuffix(".__main__")  # python -m simclr_jax.theory


def _fail(message: str) -> None:
    sys.stderr.write(f"{_program()}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)
