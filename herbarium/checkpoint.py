"""Checkpoints that load with ``weights_only=True`` and are never half-written.

A checkpoint holds only tensors, numbers, strings, lists and dicts: model
state, every optimizer phase, counters, the AMP scaler, RNG states (as
tensors) and the config. ``torch.load(weights_only=True)`` therefore reads
it without unpickling arbitrary objects, and a file that holds anything else
is refused.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herbarium.atomic import remove_quietly, write_failure
from herbarium.errors import HerbariumError


class CheckpointError(HerbariumError, RuntimeError):
    """A checkpoint file is missing, unsafe or not one of ours."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``.

    The rename is atomic on POSIX filesystems, so a crash mid-write leaves the
    previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        remove_quietly(tmp)  # a failed save leaves no half-written file behind
        failure = write_failure(path, error, kept)
        if failure is not None:
            raise failure from None
        raise
    fsync_directory(path.parent)


def temporary_path(path: Path) -> Path:
    """Where :func:`save_checkpoint` writes ``path`` before renaming it (a kill mid-save may leave it behind)."""
    return path.with_name(f".{path.name}.tmp")


def fsync_directory(folder: str | Path) -> None:
    """Flush a folder's entries to disk, so that a rename into it survives a power loss.

    ``os.replace`` changes the folder, not the file; until the folder itself
    is synced, a crash may bring back the old entry. Platforms that cannot
    open a folder (Windows) skip this.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems (and Windows) do not sync folders
    finally:
        os.close(descriptor)


def pickle_refusal(path: str | Path, error: BaseException) -> str:
    """Why a file holding pickled objects is not read, and what to do instead (not torch's advice)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" (it needs {found.group(1)})" if found else ""
    return (f"{path}: refused to load: it holds pickled Python objects{what}, and only tensors, numbers, strings, "
            "lists and dicts are read. Never load a pickle you do not trust: unpickling can run any code. "
            "If you trust the file, convert it with a trusted tool to a plain state dict "
            "(torch.save(model.state_dict(), path)) or to .safetensors")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: plain tensors and containers only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses anything but plain tensors and containers
        raise CheckpointError(pickle_refusal(path, error)) from None
    except Exception as error:  # not a torch file at all: truncated, another format, ...
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: refused to load: not a readable checkpoint file ({first_line})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a herbarium checkpoint (no 'model' entry)")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors and plain values."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                   "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
