"""When a command draws progress bars: for a person at a terminal, never into a log file.

tqdm redraws a bar in place with carriage returns; written to a file or a
pipe, every redraw becomes a line. So bars are drawn only when stderr (where
tqdm writes) is a terminal and ``--quiet`` was not given; the start-up and
end summaries and the per-epoch lines are printed either way.
"""

from __future__ import annotations

import sys
from typing import TextIO


def show_progress(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: not ``quiet``, and ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return not quiet and hasattr(stream, "isatty") and stream.isatty()
