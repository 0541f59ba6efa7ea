"""DataLoaders for training and evaluation on the CPU input path."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader

from herbarium.data.dataset import ImageDataset, collate
from herbarium.data.samplers import EpochSampler


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
) -> DataLoader:
    """A loader with the settings that keep a GPU fed.

    Persistent workers avoid re-forking each epoch; a prefetch factor of 4
    keeps batches queued while the model runs; pinned memory makes the
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
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
        worker_init_fn=worker_init_fn,
    )
