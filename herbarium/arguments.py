"""The argument parser every command uses: exact flags only, a suggestion for a typo, ``--version``, one-line errors.

* ``allow_abbrev=False``: argparse would otherwise take ``--epoch`` as
  ``--epochs`` and any unique prefix as the option it starts, so a typo
  could silently set another option.
* An unknown option gets the closest real ones as a suggestion
  (``--batchsize``: did you mean ``--batch-size``?), in one ``error:`` line
  instead of the whole usage.
* ``--version`` prints the package version. :func:`exit_if_version` answers
  it before a script imports torch (seconds), so ``train.py --version`` is
  instant.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Iterable, NoReturn, Sequence

from herbarium import __version__

VERSION_FLAGS = ("--version", "-V")
USAGE_ERROR = 2


def version_line(prog: str) -> str:
    return f"{prog} (herbarium {__version__})"


def exit_if_version(prog: str, argv: Sequence[str]) -> None:
    """Print the version and exit when ``argv`` asks for it, before anything heavy is imported."""
    if any(arg in VERSION_FLAGS for arg in argv):
        print(version_line(prog))
        raise SystemExit(0)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean --batch-size?"`` for the closest of ``choices``, or ``""``."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]}?" if matches else ""


class ArgumentParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` without prefix matching, with ``--version`` and suggestions for typos."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_line(self.prog),
                          help="print the version and exit")

    def error(self, message: str) -> NoReturn:
        """One line, ``error: PROG: MESSAGE``, with the closest options for an unknown one; exit status 2."""
        if message.startswith("unrecognized arguments:"):
            flags = list(self._option_string_actions)
            unknown = [word.split("=", 1)[0] for word in message.split(":", 1)[1].split() if word.startswith("-")]
            message += "".join(did_you_mean(word, flags).replace("; did you mean", f"; {word}: did you mean")
                               for word in unknown)
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(USAGE_ERROR)
