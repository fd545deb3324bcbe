"""Errors of both packages: one root, `StpError`, whose `exit_code` is what `stp` exits with.

Every exception a command can meet derives from one of the kinds below (and keeps its builtin base,
e.g. `ManifestError(BadData, ValueError)`, so callers that catch `ValueError` still do). The CLI
catches the root once, at its edge, and prints the message as one `Error: ...` line.

Exit codes (the README's table):
  0  EXIT_OK       everything succeeded
  1  EXIT_PARTIAL  the command ran, but some inputs failed or were skipped: a count the command
                   reports, not an exception; `Stopped` when --strict stops at the first of them
  2  EXIT_USAGE    bad usage or bad input to the command itself (`BadInput`): a bad option, a model
                   that is not one, a split DATA lacks, a source with no videos, an output path that
                   is one of the inputs, a run folder that exists without --resume ...
  3  EXIT_DATA     corrupt or inconsistent data (`BadData`): a folder without a manifest or with a
                   broken one, records that fail to read
  4  EXIT_NOT_NOW  not now (`NotNow`): a folder another process is writing (or reading), no space
                   left or no permission to write, a server that does not answer. Nothing half-done
                   is left; the same command may succeed later.

No TensorFlow here: `tfrecords_tools` is the lower package, and `stpkeras` imports this module too.
"""

from __future__ import annotations

from typing import Optional

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_NOT_NOW = 4
EXIT_CODES = (EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_DATA, EXIT_NOT_NOW)


class StpError(Exception):
    """The root of both packages' errors. `str()` is the whole message: what, where, what was expected."""

    exit_code: int = EXIT_USAGE


class BadInput(StpError):
    """Bad usage or bad input to the command itself (exit 2)."""

    exit_code = EXIT_USAGE


class BadData(StpError):
    """Corrupt or inconsistent data: a manifest, records (exit 3)."""

    exit_code = EXIT_DATA


class NotNow(StpError):
    """The command cannot do its work here and now: busy folder, no space or permission, no server (exit 4)."""

    exit_code = EXIT_NOT_NOW


class Stopped(StpError):
    """An input failed and the command was told to stop at the first failure (--strict; exit 1)."""

    exit_code = EXIT_PARTIAL


def exit_code_of(error: BaseException) -> Optional[int]:
    """The exit code of an error that reached the CLI's edge; None for anything else (a bug: keep its traceback).

    A `ValueError` that is not an `StpError` is an argument value the library refused, in Keras'
    words ("Invalid value for argument `augment`. Expected ... Received ..."): bad input, 2.
    """
    if isinstance(error, StpError):
        return error.exit_code
    if isinstance(error, ValueError):
        return EXIT_USAGE
    return None
