"""DataLoaders for training and evaluation on the CPU input path."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.data import DataLoader

from herbarium.data.dataset import ImageDataset, collate
from herbarium.data.samplers import EpochSampler

BATCHES_AHEAD = 8  # batches one process's workers keep ready between them; more only holds memory
MAX_PREFETCH = 4  # per worker, for a process with few workers


def prefetch_factor(workers: int) -> int | None:
    """Batches each worker prepares ahead: about :data:`BATCHES_AHEAD` for the process in all, 1 to :data:`MAX_PREFETCH` each.

    A fixed 4 per worker held 4 x 12 batches per process on an 8-GPU,
    96-core node; the GPU only needs the next few.
    """
    if workers <= 0:
        return None
    return max(1, min(MAX_PREFETCH, math.ceil(BATCHES_AHEAD / workers)))


def build_loader(
    dataset: ImageDataset,
    batch_size: int,
    workers: int,
    sampler: EpochSampler | None = None,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
    persistent: bool = True,
) -> DataLoader:
    """A loader with the settings that keep a GPU fed.

    Persistent workers avoid re-forking each epoch (``persistent=False``
    for a loader used now and then, such as validation, so its workers do
    not sit on memory in between); :func:`prefetch_factor` keeps a few
    batches queued while the model runs; pinned memory makes the
    host-to-device copy asynchronous.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=prefetch_factor(workers),
        generator=generator,
        worker_init_fn=worker_init_fn,
    )
