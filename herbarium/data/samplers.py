"""Epoch samplers: shuffled, class-balanced or square-root balanced, sharded, resumable.

One sampler covers the three needs torch's own samplers split between them:
class-rebalanced draws (WeightedRandomSampler), sharding across DDP ranks
(DistributedSampler) and resuming in the middle of an epoch (neither). The
order of an epoch is a pure function of ``(seed, epoch)``, so a resumed run
sees exactly the samples an uninterrupted run would have seen.

Each yielded key is ``(index, augmentation_seed)``: the dataset seeds its
random augmentation with it, so what a sample looks like is a pure function
of ``(seed, epoch, position)``, whatever the number of workers and however
often the run was interrupted.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from herbarium.data.seeding import sample_seed

SAMPLERS = ("none", "balanced", "sqrt")


def sample_weights(labels: Sequence[int] | torch.Tensor, mode: str) -> torch.Tensor | None:
    """Per-sample draw weights: 1/n_c (balanced) or 1/sqrt(n_c) (sqrt) for a sample of class c."""
    if mode not in SAMPLERS:
        raise ValueError(f"unknown sampler {mode!r}; choose one of {list(SAMPLERS)}")
    if mode == "none":
        return None
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels.clamp(min=0)).double()
    per_class = counts.reciprocal() if mode == "balanced" else counts.rsqrt()
    return per_class[labels.clamp(min=0)]


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields this rank's indices for one epoch; call :meth:`set_epoch` before each epoch.

    Rank ``r`` takes positions ``r, r + num_replicas, ...`` of the epoch's
    order, so the ``k``-th batch of every rank together is positions
    ``[k * G, (k + 1) * G)`` with ``G = batch_size * num_replicas``: the same
    images for the same ``G`` on any number of processes. With
    ``batch_size`` (training, which drops a last incomplete batch) the epoch
    is the whole global batches of the order, rather than each rank's share
    padded and then cut, so that its length and its images depend on ``G``
    alone, and a run resumed with another number of processes (and the same
    ``G``) continues exactly.
    """

    def __init__(
        self,
        num_samples: int,
        weights: torch.Tensor | None = None,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int | None = None,
    ) -> None:
        self.num_samples = num_samples
        self.weights = weights
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0
        global_batch = batch_size * num_replicas if batch_size else 0
        if global_batch and num_samples >= global_batch:
            # Whole global batches only: positions [0, k * global_batch) of the order, however they are shared out.
            self.per_replica = num_samples // global_batch * batch_size
        else:
            self.per_replica = math.ceil(num_samples / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` indices (of this rank) on resume."""
        self.epoch, self.start = epoch, start

    def epoch_order(self) -> torch.Tensor:
        """All ranks' indices for the epoch: padded by wrapping so every rank gets as many, or cut to whole global batches."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        total = self.per_replica * self.num_replicas
        if total > len(order) > 0:
            # Wrap as often as needed: with more replicas than samples one copy is not enough.
            order = order.repeat(math.ceil(total / len(order)))
        return order[:total]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order().tolist()
        for position in range(self.rank + self.start * self.num_replicas, len(order), self.num_replicas):
            yield order[position], sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.per_replica - self.start
