"""Expected errors and how the command line reports them.

An *expected* error is the user's to fix: bad data, a bad option, a refused
file, a run folder that is not one. Every command prints it as one line,
``error: <message>``, on stderr and exits with status 2. Anything else is a
bug and keeps its traceback.

Expected are:

* :class:`HerbariumError` and its subclasses (``DatasetError``,
  ``TaxonomyError``, ``BadImageError``, ``CheckpointError``,
  ``NonFiniteLossError``, :class:`UsageError`, :class:`ConfigError`, ...), raised by our own checks;
* a missing, existing or forbidden path (``FileNotFoundError``,
  ``FileExistsError``, ``NotADirectoryError``, ``IsADirectoryError``,
  ``PermissionError``) wherever it is raised;
* a ``ValueError`` raised by herbarium's own code (the innermost frame of
  its traceback is in the ``herbarium`` package): our validation of
  options. A ``ValueError`` from inside numpy, torch or another library is
  a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from types import TracebackType
from typing import Callable, Sequence, TypeVar

EXIT_USAGE = 2  # the status of every expected error, as argparse uses for bad options
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a process ended by SIGINT
WORKER_HEADER = "in DataLoader worker process"  # how torch re-raises a worker's error: its traceback as the message

PACKAGE_DIR = Path(__file__).resolve().parent
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class HerbariumError(Exception):
    """Base of the errors herbarium raises for the user to fix (see the module docstring)."""


class UsageError(HerbariumError, ValueError):
    """A bad option or combination of options, or a folder that is not what an option needs."""


class ConfigError(HerbariumError, ValueError):
    """A saved config (a run's ``config.json``, a checkpoint's copy) that this version cannot read as it was written."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying what was kept and how to go on (``interrupted at epoch 2 step 37; resume with: ...``)."""


class DistributedError(HerbariumError, RuntimeError):
    """A process of a distributed run lost the others (one died or hung past the timeout)."""


def _innermost_file(traceback: TracebackType | None) -> Path | None:
    last = None
    while traceback is not None:
        last = traceback
        traceback = traceback.tb_next
    return Path(last.tb_frame.f_code.co_filename).resolve() if last is not None else None


def is_expected(error: BaseException) -> bool:
    """Whether ``error`` is one for the user to fix (one line, status 2) rather than a bug (a traceback)."""
    if isinstance(error, (HerbariumError, *PATH_ERRORS)):
        return True
    if isinstance(error, ValueError) and not isinstance(error, UnicodeError):
        where = _innermost_file(error.__traceback__)
        return where is not None and PACKAGE_DIR in where.parents
    return False


def message(error: BaseException) -> str:
    """The one line printed for an expected error."""
    text = unwrap_worker_message(error, str(error)) if str(error) else type(error).__name__
    if isinstance(error, PATH_ERRORS) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(text.split("\n"))


def unwrap_worker_message(error: BaseException, text: str) -> str:
    """The original message of an error raised in a DataLoader worker, without the traceback torch wraps it in."""
    if WORKER_HEADER not in text.partition("\n")[0]:
        return text
    _, found, original = text.rpartition(f"{type(error).__name__}: ")
    return original.strip() if found else text


F = TypeVar("F", bound=Callable[..., int | None])


def command(main: F) -> F:
    """Decorate a command's ``main(argv)``: expected errors become ``error: <message>`` on stderr and status 2.

    Every command line entry point goes through this (``herbarium COMMAND``,
    ``train.py``, ``tta_eval.py``, ``collect-stats``), so the rule lives here only.
    Ctrl-C prints one line (an :class:`Interrupted`'s own, else ``interrupted``)
    and exits with status 130.
    """

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except KeyboardInterrupt as error:
            sys.stdout.flush()
            print(str(error) if isinstance(error, Interrupted) else "interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except Exception as error:  # noqa: BLE001 - sorted into expected (one line) and bugs (re-raised)
            if not is_expected(error):
                raise
            sys.stdout.flush()
            print(f"error: {message(error)}", file=sys.stderr, flush=True)
            return EXIT_USAGE

    return wrapped  # type: ignore[return-value]
