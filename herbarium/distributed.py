"""Distributed data parallel under ``torchrun``: reading its environment, and rank-0 helpers."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, timeout: float | None = None) -> DistributedContext:
    """Join the process group torchrun describes in the environment; single process otherwise.

    NCCL on CUDA, gloo on CPU. Launch with
    ``torchrun --nproc-per-node N train.py ...`` (add ``--nnodes`` and a
    rendezvous endpoint for several machines). ``timeout``: seconds a
    collective waits for the other processes before failing (default:
    torch's, 30 minutes); a process that dies is noticed at once.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        extra = {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}
        # The store torchrun hands a restarted job may still hold the first attempt's keys (each process's address),
        # and the restarted processes would connect to the dead ones: each attempt gets keys of its own.
        store, rank, size = next(dist.rendezvous("env://", **extra))
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", store=dist.PrefixStore(
            f"herbarium/attempt_{restart_count()}", store), rank=rank, world_size=size, **extra)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def restart_count() -> int:
    """How many times torchrun has restarted this job's processes (``--max-restarts``); 0 on the first attempt."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


COLLECTIVE_FAILURES = ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timeout caused pair closure")


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective operation failing because another process died or hung.

    Gloo and NCCL raise plain ``RuntimeError``: it counts when raised inside
    ``torch.distributed`` (or DDP) or when its message is one of theirs.
    """
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    traceback = error.__traceback__
    while traceback is not None:
        name = traceback.tb_frame.f_code.co_filename.replace("\\", "/")
        if "torch/distributed/" in name or name.endswith("torch/nn/parallel/distributed.py"):
            return True
        traceback = traceback.tb_next
    return any(marker in str(error) for marker in COLLECTIVE_FAILURES)


def timeout_text(timeout: float | None) -> str:
    return f"{timeout:g} s" if timeout else "30 min default"


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def all_gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``value`` (used for validation predictions, once per epoch)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
