"""Image files stay inside their dataset: a symbolic link that leads out of the root is refused.

Metadata paths are checked when they are read (no absolute paths, no
``..``; see :func:`herbarium.data.readers.safe_relative_path`), but a
symbolic link under the root, to a file or a folder, could still lead
anywhere: an untrusted dataset could make herbarium read any file the user
can read and show it as a thumbnail in a report. Each file is therefore
resolved to its real path when it is opened, and one outside the real
dataset root is refused. A dataset whose images really live elsewhere
behind links is read by setting ``HERBARIUM_ALLOW_SYMLINKS_OUT=1``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from herbarium.errors import HerbariumError

ALLOW_ENV = "HERBARIUM_ALLOW_SYMLINKS_OUT"


class OutsideRootError(HerbariumError, ValueError):
    """A dataset file that a symbolic link takes out of the dataset root."""


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def confined(path: Path, root: Path, image_id: Any) -> Path:
    """``path`` when its real location lies under ``root``'s (links inside the root are fine); else refused."""
    if os.environ.get(ALLOW_ENV) == "1":
        return path
    real, real_root = os.path.realpath(path), _real_root(str(root))
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
        return path
    raise OutsideRootError(f"image {image_id!r} at {path}: a symbolic link leads out of the dataset root {root} "
                           f"(to {real}); refused, as a dataset could otherwise make herbarium read any file. "
                           f"If you trust the links, set {ALLOW_ENV}=1")
