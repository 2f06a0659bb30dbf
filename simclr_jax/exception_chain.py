"""An error and the errors it was raised from or while handling, as a traceback shows them.

Used where a one-line message names the innermost cause (the command line's errors, a checkpoint
that does not read). A `raise ... from None` hides the context, as the traceback does: json's
decoder raises its JSONDecodeError that way over a StopIteration whose text is a bare number.
"""

from __future__ import annotations


def chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors under it, outermost first (a cycle ends the list)."""
    found = [error]
    while (inner := _under(found[-1])) is not None and all(inner is not e for e in found):
        found.append(inner)
    return found


def root_cause(error: BaseException) -> BaseException:
    """The innermost error a traceback of `error` shows."""
    return chain(error)[-1]


def _under(error: BaseException) -> BaseException | None:
    if error.__cause__ is not None or error.__suppress_context__:
        return error.__cause__
    return error.__context__
