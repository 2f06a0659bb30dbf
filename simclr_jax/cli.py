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

Logs: orbax writes about 40 INFO lines per checkpoint about its own machinery, and JAX one about
the TPU backend it did not find; unless --verbosity >= 1 these are dropped. Their warnings and
errors, and every other line, stay. Orbax logs through absl's one logger, so there is no orbax
logger to give a level: a filter on that logger drops its records by their source file.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from simclr_jax import distributed

# The flags this module defines belong to the stage that calls it (its key flags, for --help).
flags.disclaim_key_flags()

HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")
USER_ERRORS = (ValueError, RuntimeError, ImportError, OSError)  # when simclr_jax raises them
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_ORBAX = f"{os.sep}orbax{os.sep}"


def run_stage(train_and_evaluate: Callable[..., dict[str, Any]], what: str) -> None:
    """Define the common flags, join a multi-process job if one is described, run, print results."""
    config_flags.DEFINE_config_file("config", None, f"{what} config file.", lock_config=True)
    flags.declare_key_flag("config")  # defined by ml_collections; listed as this stage's
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")
    flags.DEFINE_integer("stop_at_step", None, "End this run at this step (rerun to resume).")
    flags.DEFINE_bool(
        "accept_config_changes",
        False,
        "Resume a workdir although the config changes the run (recorded in config_history.jsonl).",
    )
    distributed.define_flags()
    flags.adopt_module_key_flags(distributed)
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv) -> None:
        del argv
        logging.getLogger().setLevel(logging.INFO)
        distributed.initialize()
        values = flags.FLAGS
        results = train_and_evaluate(
            values.config,
            values.workdir,
            stop_at_step=values.stop_at_step,
            accept_config_changes=values.accept_config_changes,
        )
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()})

    run(main)


def run(main: Callable[[list[str]], Any]) -> None:
    """absl's app.run(main), with this module's rules for help, errors and logs (docstring)."""

    def guarded(argv: list[str]) -> Any:
        if not _verbose():
            logging.getLogger("absl").addFilter(_drop_orbax_info)
            # "Unable to initialize backend 'tpu'" on every machine without one (INFO).
            logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
        try:
            return main(argv)
        except Exception as error:
            if _verbose() or not is_user_error(error):
                raise
            _fail(one_line(error))

    app.run(guarded, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, but help exits 0 and a rejected flag is one line (no traceback)."""
    try:
        return flags.FLAGS(list(argv))
    except SystemExit as stop:
        if stop.code and asks_for_help(argv[1:]):
            raise SystemExit(0) from None
        raise
    except (flags.Error, KeyError, AttributeError, ValueError) as error:
        root = _root_cause(error)
        if _verbose() or not isinstance(root, ValueError | KeyError | OSError | flags.Error):
            raise  # a config file's own bug (a TypeError, a NameError, ...) keeps its traceback
        _fail(f"{_flag_message(error, root)} (see --help)")


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
    unknown = next((e for e in _chain(error) if isinstance(e, KeyError)), None)
    if unknown is not None:  # ml_collections: an override of a field that does not exist
        name, *suggestion = str(unknown.args[0] if unknown.args else unknown).splitlines()
        return f"no such config field {name}" + "".join(f"; {line}" for line in suggestion)
    return one_line(root if "\n" in str(error) and root is not error else error)


def _chain(error: BaseException) -> list[BaseException]:
    """The error and the ones it was raised from or while handling, outermost first."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(inner)
    return chain


def _root_cause(error: BaseException) -> BaseException:
    return _chain(error)[-1]


# Orbax warnings that only describe what was asked for (reading a workdir read-only).
_ORBAX_NOTICES = ("Given directory is read only",)


def _drop_orbax_info(record: logging.LogRecord) -> bool:
    """Keep a log record unless it is orbax's, below WARNING or one of its notices."""
    if _ORBAX not in record.pathname:
        return True
    if record.levelno >= logging.ERROR:
        return True
    notice = any(text in str(record.msg) for text in _ORBAX_NOTICES)
    return record.levelno >= logging.WARNING and not notice


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
