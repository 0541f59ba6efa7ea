"""What every command needs from the machine: the device, autocast precision and worker counts.

Training, evaluation, prediction and the benchmarks all ask these questions;
they live here so that none of them imports another command to answer them.
"""

from __future__ import annotations

import contextlib
import os

import torch

from herbarium.errors import UsageError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name as torch reads it (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; give cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise UsageError(f"--device {name}: this machine has {found} (torch {torch.__version__}); "
                         "use --device cpu, or auto to take a GPU when there is one")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default (no loss scaling needed), full precision on CPU; None: no autocast."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    return _AUTOCAST_DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` at ``dtype``, or a no-op context for full precision."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def default_workers() -> int:
    """The cores this process may run on (its affinity where the OS tells it), for DataLoader workers."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
