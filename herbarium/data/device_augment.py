"""Augmentation of decoded images on the device: the CPU path's transforms, batched where they can be.

The CPU path augments each PIL image in a worker. On the GPU input path the
images are uint8 [3, H, W] tensors on the device, decoded a batch at a
time, and :class:`BatchTransform` gives every view of every image of a
batch at once: each sample's random parameters are drawn on the CPU from
its seed (:mod:`herbarium.data.geometry`) and applied to the whole batch in
a fixed number of device calls (:mod:`herbarium.data.resample`). Presets
that are not crops, resizes and flips run the same v2 op objects image by
image (:func:`augment_images`). :func:`normalize` converts a batch once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from herbarium.data import augment
from herbarium.data.geometry import Plan, batchable, plan_geometry
from herbarium.data.resample import axis_numbers, compute_dtype, draft_weights, filter_weights, pad_batch, resample
from herbarium.data.seeding import seeded
from herbarium.data.transforms import eval_transform

# Ops that turn a PIL image into a normalised float tensor: on this path they are done once per batch.
_CONVERSIONS = (v2.ToImage, v2.PILToTensor, v2.ToPureTensor, v2.ToDtype, v2.Normalize)


def tensor_ops(transform: Callable) -> v2.Compose:
    """The ops of a CPU-path transform (a preset, ``eval_transform``, a TTA view) without its tensor conversion.

    The same op objects, flattened out of nested ``Compose``; ``ToImage``,
    ``ToDtype`` and ``Normalize`` are left out because :func:`normalize`
    does them once per batch.
    """
    ops: list[Callable] = []

    def flatten(item: Callable) -> None:
        if isinstance(item, v2.Compose):
            for inner in item.transforms:
                flatten(inner)
        elif not isinstance(item, _CONVERSIONS):
            ops.append(item)

    flatten(transform)
    return v2.Compose(ops)


def train_ops(preset: str, size: int) -> v2.Compose:
    """The training preset's augmentation ops, shared with the CPU path."""
    return v2.Compose(augment.preset_ops(preset, size))


def eval_ops(size: int) -> v2.Compose:
    """``eval_transform``'s resize and centre crop."""
    return tensor_ops(eval_transform(size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))


def apply_seeded(ops: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int | None) -> torch.Tensor:
    """``ops(image)`` with the CPU generator seeded as :class:`ImageDataset` seeds it; ``None``: unseeded.

    See :func:`~herbarium.data.seeding.seeded` for which generator that is.
    """
    if seed is None:
        return ops(image)
    with seeded(seed):
        return ops(image)


def augment_images(images: Sequence[torch.Tensor], seeds: Sequence[int | None], ops: Callable[[torch.Tensor], torch.Tensor],
                   size: int) -> torch.Tensor:
    """uint8 [3, H_i, W_i] images -> uint8 [B, 3, size, size]: ``ops`` per image, then resized to ``size`` if needed."""
    outputs = []
    for image, seed in zip(images, seeds):
        output = apply_seeded(ops, image, seed)
        if tuple(output.shape[-2:]) != (size, size):
            output = F.resize(output, [size, size], antialias=True)
        outputs.append(output)
    return torch.stack(outputs)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Grey levels [B, 3, H, W] (uint8, or float from :class:`BatchTransform`) -> float32 channels_last, normalised.

    As ``ToDtype(scale=True)`` + ``Normalize`` on the CPU path.

    ``mean``/``std``: float32 [3] on the images' device, in [0, 1] pixel units.
    """
    floats = images.to(dtype=torch.float32, memory_format=torch.channels_last)
    return floats.mul_(1.0 / 255).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def image_moments(images: torch.Tensor) -> torch.Tensor:
    """Grey levels [B, 3, H, W] -> [B, 3 (count, mean, m2), 3 channels] float64, as collect-stats computes per image."""
    pixels = images.to(torch.float32).mul_(1.0 / 255).double().flatten(2)  # [B, 3, H*W]
    mean = pixels.mean(dim=2)
    m2 = ((pixels - mean[..., None]) ** 2).sum(dim=2)
    count = torch.full_like(mean, float(pixels.shape[2]))
    return torch.stack([count, mean, m2], dim=1)


def draft_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, height, width], the draft-mode size (see :func:`~herbarium.data.gpu.draft_size`)."""
    if tuple(image.shape[-2:]) == size:
        return image
    # Of the resizes tried, an area average comes closest to libjpeg's reduced-size DCT.
    reduced = torch.nn.functional.interpolate(image[None].float(), size=size, mode="area")
    return reduced[0].round_().to(torch.uint8)


class BatchTransform:
    """Views of a batch: ``view_ops[v]`` applied to every image, seeded per image and view, all at once.

    Where every view is a chain of crops, one bilinear antialiased resize and
    flips (:func:`~herbarium.data.geometry.batchable`: ``crop_flip``,
    ``square_resize``, ``none`` and every evaluation view), :meth:`plan`
    draws each sample's parameters on the CPU and :meth:`run` applies them
    to the whole batch in a fixed number of device calls
    (:mod:`herbarium.data.resample`), draft-mode reduction included. Other
    presets (affine, perspective, erasing) run image by image with their v2
    ops (:func:`apply_seeded`), drawing from the global generator, so their
    loaders stay on the main thread.
    """

    def __init__(self, view_ops: Sequence[v2.Compose], size: int) -> None:
        self.view_ops = [list(ops.transforms) for ops in view_ops]
        self.composed = list(view_ops)
        self.size = size
        self.batched = all(batchable(ops) for ops in self.view_ops)

    def plan(self, sizes: Sequence[tuple[int, int]], seeds: Sequence[Sequence[int | None]]) -> list[list[Plan]] | None:
        """Per image and view, the plan for draft-size ``sizes[i]`` with seed ``seeds[i][v]``; ``None``: image by image."""
        if not self.batched:
            return None
        plans = [[plan_geometry(ops, height, width, self.size, seed) for ops, seed in zip(self.view_ops, image_seeds)]
                 for (height, width), image_seeds in zip(sizes, seeds)]
        return None if any(plan is None for image_plans in plans for plan in image_plans) else plans

    def run(self, decoded: "Decoded", plans: list[list[Plan]] | None, seeds: Sequence[Sequence[int | None]]) -> torch.Tensor:
        """Every view of every image: [B, V, 3, size, size] in whole grey levels (0-255), float."""
        if plans is None:
            return self._one_by_one(decoded, seeds)
        drafted = decoded.drafted()  # [B, 3, H, W]
        flat = [plan for image_plans in plans for plan in image_plans]
        shape = (len(plans), len(self.view_ops))
        rows = filter_weights(axis_numbers([plan.rows for plan in flat], drafted.device), self.size, drafted.shape[2])
        cols = filter_weights(axis_numbers([plan.cols for plan in flat], drafted.device), self.size, drafted.shape[3])
        return resample(drafted, rows.unflatten(0, shape), cols.unflatten(0, shape))

    def _one_by_one(self, decoded: "Decoded", seeds: Sequence[Sequence[int | None]]) -> torch.Tensor:
        images = [decoded.drafted_image(i) for i in range(len(decoded.images))]
        views = [augment_images(images, [image_seeds[v] for image_seeds in seeds], ops, self.size)
                 for v, ops in enumerate(self.composed)]
        return torch.stack(views, dim=1).float()


@dataclass
class Decoded:
    """The readable images of a batch as decoded (uint8 [3, H, W]) and the draft size of each, (height, width)."""

    images: list[torch.Tensor]
    sizes: list[tuple[int, int]]
    dtype: torch.dtype | None = None  # of the batched work; None: compute_dtype of the images' device
    _drafted: torch.Tensor | None = None

    def drafted(self) -> torch.Tensor:
        """[B, 3, max height, max width] in ``dtype``: every image at its draft size, zero-padded; computed once."""
        if self._drafted is None:
            padded = pad_batch(self.images, self.dtype or compute_dtype(self.images[0].device))  # [B, 3, H, W]
            if all(tuple(image.shape[-2:]) == size for image, size in zip(self.images, self.sizes)):
                self._drafted = padded
            else:
                lengths = torch.tensor([list(image.shape[-2:]) + list(size) for image, size in zip(self.images, self.sizes)])
                lengths = lengths.to(padded.device, non_blocking=True)  # [B, 4]: height, width, draft height, draft width
                rows = draft_weights(lengths[:, 0], lengths[:, 2], padded.shape[2])
                cols = draft_weights(lengths[:, 1], lengths[:, 3], padded.shape[3])
                self._drafted = resample(padded, rows[:, None], cols[:, None], round_between=False)[:, 0]
        return self._drafted

    def drafted_image(self, position: int) -> torch.Tensor:
        """uint8 [3, height, width]: one image at its draft size, for the image-by-image path."""
        return draft_image(self.images[position], self.sizes[position])


