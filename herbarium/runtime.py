"""What every command needs from the machine: the device, autocast precision and worker counts.

Training, evaluation, prediction and the benchmarks all ask these questions;
they live here so that none of them imports another command to answer them.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

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


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def make_deterministic() -> None:
    """Deterministic kernels only, for bit-identical GPU runs; before any CUDA work, since cuBLAS reads its setting
    once."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs (CUDA docs)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def default_workers() -> int:
    """The cores this process may run on: its affinity (cpusets, ``taskset``), capped by a cgroup CPU quota.

    A container started with ``--cpus 8`` on a 96-core host keeps an
    affinity of 96 cores but gets the time of 8; workers beyond that only
    hold memory.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def cgroup_cpu_quota(path: Path = CGROUP_CPU_MAX) -> int | None:
    """Whole CPUs the cgroup v2 quota allows (rounded up), or None where there is no quota or no such file."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def local_processes() -> int:
    """Processes a launcher (``torchrun``) started on this machine: ``LOCAL_WORLD_SIZE``, 1 without one."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1
