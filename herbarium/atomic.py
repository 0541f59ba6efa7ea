"""Files and folders that are whole or absent: written beside their target and renamed over it.

A reader (a resumed run, ``tta_eval.py``, a person) never sees half of a
``config.json`` or a CSV: the new content goes to a temporary file in the
same folder, which ``os.replace`` then puts in the target's place in one
step. When the write fails (disk full, a file-size limit, a read-only or
immutable folder) the previous file is left as it was, and the error says
so in one line (:func:`write_failure`) instead of the C++ internals torch
reports.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from herbarium.errors import HerbariumError

# errno -> what went wrong, as a user reads it
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on {device}",
    errno.EDQUOT: "disk quota exceeded on {device}",
    errno.EFBIG: "the file size limit (ulimit -f) was reached on {device}",
    errno.EROFS: "{device} is a read-only file system",
    errno.EACCES: "permission denied on {device}",
    errno.EPERM: "the folder is not writable (permission denied or immutable) on {device}",
}
_LOW_SPACE = 64 * 2**20  # a torch write that fails with less free than this ran out of space


class WriteError(HerbariumError, OSError):
    """A file could not be written for a reason outside herbarium (space, quota, a read-only folder)."""


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system ``path`` lives on (the 'device' a user recognises: /, /data, ...)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def write_failure(path: str | Path, error: BaseException, kept: str) -> WriteError | None:
    """The one-line error for a write of ``path`` that failed with ``error``; None for an error of another kind.

    ``kept`` says what survives (``"the previous checkpoint is intact"``).
    torch's writer reports a full disk as a ``RuntimeError`` from its C++
    side (``unexpected pos``, ``file write failed``) with no errno; it is
    read as out-of-space when the file system has next to nothing free.
    """
    device = mount_point(Path(path).parent)
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        reason = _WRITE_ERRNOS[error.errno]
    elif isinstance(error, RuntimeError) and any(text in str(error) for text in ("unexpected pos", "file write failed")):
        try:
            free = shutil.disk_usage(device).free
        except OSError:
            free = 0
        reason = _WRITE_ERRNOS[errno.ENOSPC] if free < _LOW_SPACE else "the write failed on {device} ({detail})"
    else:
        return None
    detail = (str(error).splitlines() or [type(error).__name__])[0]
    return WriteError(f"{reason.format(device=device, detail=detail)} while writing {path}; {kept}")


def remove_quietly(path: str | Path) -> None:
    """Remove a temporary file if it can be: on a read-only folder the clean-up must not hide the real error."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_atomic(path: Path | str, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = "the previous file is intact" if path.exists() else "nothing was written"
    temp_name = None
    try:
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.chmod(temp_name, 0o644)  # mkstemp makes it private; outputs are for everyone to read
        os.replace(temp_name, path)
    except BaseException as error:
        if temp_name is not None:
            remove_quietly(temp_name)
        failure = write_failure(path, error, kept)
        if failure is not None:
            raise failure from None
        raise
    return path


@contextlib.contextmanager
def staged_folder(final: str | Path, outputs: Sequence[str]) -> Iterator[Path]:
    """An empty hidden folder beside ``final`` to write into; on success its content takes the place of ``final``'s.

    ``outputs``: the names the writer owns in ``final``. Those of an earlier
    write are moved out together, so ``final`` never holds some files of one
    write beside some of another; any other file in ``final`` stays. When the
    body fails or is interrupted, the staging folder is removed and ``final``
    is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; when it becomes ``final`` it is for everyone to read
    try:
        yield staging
        _swap_in(staging, final, outputs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, final: Path, outputs: Sequence[str]) -> None:
    """Move ``staging``'s entries into ``final`` after moving the earlier ``outputs`` aside (renames only, no copying)."""
    if not final.exists():
        os.replace(staging, final)
        return
    earlier = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.earlier-"))
    try:
        for name in {*outputs, *(entry.name for entry in staging.iterdir())}:
            if (final / name).exists():
                os.replace(final / name, earlier / name)
        for entry in staging.iterdir():
            os.replace(entry, final / entry.name)
    finally:
        shutil.rmtree(earlier, ignore_errors=True)
