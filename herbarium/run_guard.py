"""Who may write a run folder: the marker that says a run made it, and the lock held while one trains in it.

* A new run starts only in a missing or empty folder, a folder without
  any file training writes, or a folder whose marker (``run.json``) says a
  run made it. A folder holding ``config.json``, ``log.jsonl``,
  ``checkpoints/`` ... without the marker is someone else's: it is refused,
  ``--overwrite`` or not, so that nothing of theirs is replaced or deleted.
* The training process holds an OS file lock (``flock``) on ``RUN/.lock``
  for as long as it lives: a second process on the same folder stops,
  naming the holder's pid. The OS releases the lock on any exit, kill -9
  included, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import IO

from herbarium import __version__
from herbarium.atomic import write_atomic
from herbarium.checkpoint import temporary_path
from herbarium.errors import UsageError
from herbarium.run_dir import MARKER, RunDir

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are not locked there
    fcntl = None  # type: ignore[assignment]


def claim(run: RunDir, *, resuming: bool, overwrite: bool) -> IO[str]:
    """Make ``run`` this process's run folder, or refuse; returns the open lock file (keep it open to hold the lock)."""
    if not resuming:
        refuse_foreign(run)
    lock = hold_lock(run)
    for stale in run.checkpoints.glob(".*.pt.tmp"):  # a save killed halfway; the lock says no one is writing it now
        stale.unlink()
    if not resuming and run.has_checkpoints():
        if not overwrite:
            raise FileExistsError(f"{run} already holds a run; pass --resume {run} to continue it, "
                                  "--overwrite to start again, or another --out")
        run.clear_training_outputs()
    if not run.made_by_a_run():  # first thing written, so that the folder is known as a run's from now on
        write_marker(run)
    return lock


def write_marker(run: RunDir) -> None:
    """Mark ``run``'s folder as made by herbarium (``run.json``): only such a folder is ever cleared by ``--overwrite``."""
    write_atomic(run.marker, json.dumps({"herbarium": __version__,
                                         "created": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")


def refuse_foreign(run: RunDir) -> None:
    """Refuse a folder that holds files training writes but was not made by a run (no marker)."""
    found = run.training_outputs()
    if found and not run.made_by_a_run():
        raise UsageError(f"--out {run}: the folder holds {', '.join(found)} but no {MARKER}, so no herbarium run made it; "
                         "a run neither replaces nor deletes files it did not write (--overwrite included). "
                         "Train into another --out, or move those files away")


def hold_lock(run: RunDir) -> IO[str]:
    """Lock ``RUN/.lock`` for this process (released by the OS when it exits); refuse when another process holds it."""
    run.path.mkdir(parents=True, exist_ok=True)
    handle = open(run.lock_file, "a+")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UsageError(f"{run} is in use: another training process (pid {holder}) holds {run.lock_file}; "
                         "wait for it to end, or train into another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
