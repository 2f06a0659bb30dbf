"""Many `python -m <module> <args>` runs for the price of one interpreter start.

    python tests/forked_commands.py '[["simclr_jax.pretrain", "--help"], ...]'

or, from a test, `forked_commands.run([[module, *args], ...])`: a CompletedProcess each. A
module "-c" runs its first argument as code, as `python -c CODE ARGS...` does.

A command's start is mostly importing JAX, Flax, orbax and the package (about a second of CPU);
its `--help` or a flag error takes milliseconds after that. This script imports the package's
modules once, then forks a child per command that runs the module as `python -m` does (runpy,
as `__main__`, with its own sys.argv), its stdout and stderr in files of its own. The children
run side by side; the parent prints one JSON line: [[returncode, stdout, stderr], ...] in order.

Only for runs that end before JAX starts a backend (help, flag and config errors): the parent
never starts one, so nothing JAX runs is shared across the fork. The command modules themselves
are not imported first (runpy warns about a module already imported): a child removes any that
another module imported, so its `__main__` is the module's own fresh run, as under `python -m`.
"""

import importlib
import json
import os
import pathlib
import pkgutil
import runpy
import subprocess
import sys
import tempfile
import traceback


def run(
    runs: list[list[str]], cwd: str | os.PathLike | None = None
) -> list[subprocess.CompletedProcess]:
    """`python -m module *args` (or `python -c`) for each [module, *args] of `runs`."""
    done = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).resolve()), json.dumps(runs)],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"forked_commands failed:\n{done.stderr[-3000:]}")
    results = json.loads(done.stdout.splitlines()[-1])
    return [
        subprocess.CompletedProcess(r, *result) for r, result in zip(runs, results, strict=True)
    ]


def preload(commands: set[str]) -> None:
    """Imports the package's modules other than the commands, with their dependencies (a module
    whose optional dependency is not installed is left to the command that needs it)."""
    import simclr_jax

    for info in pkgutil.walk_packages(simclr_jax.__path__, "simclr_jax."):
        if info.name in commands or info.name.endswith(".__main__") or ".configs" in info.name:
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError:
            continue


def child(module: str, args: list[str], out: str, err: str) -> None:
    """Runs in the forked child: never returns."""
    code = 0
    with open(out, "w") as stdout, open(err, "w") as stderr:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        try:
            if module == "-c":  # python -c CODE ARGS...
                sys.argv = ["-c", *args[1:]]
                exec(compile(args[0], "<string>", "exec"), {"__name__": "__main__"})
            else:
                if not hasattr(sys.modules.get(module), "__path__"):  # a package runs __main__
                    sys.modules.pop(module, None)
                sys.modules.pop(module + ".__main__", None)
                sys.argv = [module, *args]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if isinstance(done.code, str):
                print(done.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)


def main() -> None:
    runs = json.loads(sys.argv[1])
    preload({module for module, *_ in runs})
    with tempfile.TemporaryDirectory(prefix="forked_commands_") as folder:
        children = []
        for i, (module, *args) in enumerate(runs):
            out, err = os.path.join(folder, f"{i}.out"), os.path.join(folder, f"{i}.err")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(module, args, out, err)
            children.append((pid, out, err))
        results = []
        for pid, out, err in children:
            _, status = os.waitpid(pid, 0)
            with open(out) as stdout, open(err) as stderr:
                results.append([os.waitstatus_to_exitcode(status), stdout.read(), stderr.read()])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
