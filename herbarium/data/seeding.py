"""The one rule for seeding augmentation, used by every input path.

Each image's random augmentation is a pure function of a seed: the training
sampler gives each draw ``sample_seed(seed, epoch, position)``, the
evaluation views get ``view_seed(seed, index, view)``. The CPU path (PIL in
the workers), the evaluation views and the device path all run their random
transforms inside :func:`seeded`, so the same seed gives the same crop on
either path, and a resumed run replays its epoch exactly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

SEED_MASK = 0x7FFFFFFF  # seeds stay positive 31-bit integers, valid for every generator


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the draw at ``position`` of ``epoch`` (a pure function: a resume replays it)."""
    return hash((seed, epoch, position)) & SEED_MASK


def view_seed(seed: int, index: int, view: int) -> int:
    """The seed of view number ``view`` of the image at dataset index ``index``."""
    return hash((seed, index, view)) & SEED_MASK


def view_seeds(indices: Sequence[int], views: int, seed: int) -> list[list[int]]:
    """:func:`view_seed` of every view of every image in ``indices``: ``[image][view]``."""
    return [[view_seed(seed, index, number) for number in range(views)] for index in indices]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU generator seeded with ``seed``, then restore it.

    torchvision's random transforms draw their parameters from the CPU
    generator whatever the image's device, so that is the one seeded. It is
    seeded directly rather than through ``torch.manual_seed``, which would
    also reseed every CUDA generator (dropout's), and ``fork_rng(devices=[])``
    restores only the CPU one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
