"""Per-sample geometry of crop, resize and flip transforms, drawn on the CPU from the sample's seed.

A chain of torchvision v2 crops, resizes and flips acts on each image axis
separately, and along one axis it always reduces to the same four steps:

    output = window(flip(resize(crop(axis))))

``crop`` picks an interval of the (draft-size) input, ``resize`` resamples
it with the antialiased bilinear filter, ``flip`` may reverse the result,
and ``window`` picks ``size`` positions of it (zero outside, which is how
a centre crop larger than the image pads). :func:`plan_geometry` walks the
ops of a transform and returns these numbers for both axes; the random ones
(:class:`~torchvision.transforms.v2.RandomResizedCrop`'s box, the flips'
coin) are drawn exactly as the ops draw them, in the same order, but from a
private generator seeded with the sample's seed. The draws are the ones
the CPU path makes for the same seed, so both paths crop the same box, and
the global generator (dropout's, on a CPU device) is never touched, which
lets a background thread plan batches while the model trains.

:mod:`herbarium.data.resample` turns the plans of a batch into weight
matrices and the whole batch into its outputs in a few device calls.
Chains with a second resampling, or with ops that are not crops, resizes or
flips (affine, perspective, erasing), have no plan: :func:`batchable` says
so up front, and those presets run image by image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size

from herbarium.data.transforms import FiveCropCorner

_RESAMPLING = (v2.RandomResizedCrop, v2.Resize)
_MOVING = (v2.CenterCrop, FiveCropCorner, v2.RandomHorizontalFlip, v2.RandomVerticalFlip)


@dataclass(frozen=True)
class AxisPlan:
    """One axis of one sample: ``window(flip(resize(crop(axis))))``; lengths in pixels of the draft-size image.

    ``crop_start``/``crop_length``: the interval resampled (inside the image);
    ``resized``: its length after the resize (``crop_length``: none);
    ``flip``: whether the resized axis is reversed; ``window_start``: the
    first of the output positions on it (negative or past the end: zeros).
    """

    crop_start: int
    crop_length: int
    resized: int
    flip: bool
    window_start: int
    length: int  # output length


@dataclass(frozen=True)
class Plan:
    rows: AxisPlan
    cols: AxisPlan


class _Unplannable(Exception):
    """A chain that needs what a plan cannot say (a second resampling, a padded crop before a resize)."""


@dataclass(frozen=True)
class _Axis:
    """An axis while the ops are walked; ``resized is None`` until the one resampling op."""

    length: int
    crop_start: int
    crop_length: int
    resized: int | None = None
    flip: bool = False
    window_start: int = 0

    @property
    def domain(self) -> int:
        return self.crop_length if self.resized is None else self.resized

    def window(self, start: int, length: int) -> "_Axis":
        return replace(self, window_start=self.window_start + start, length=length)

    def flipped(self) -> "_Axis":
        return replace(self, flip=not self.flip, window_start=self.domain - self.window_start - self.length)

    def resize(self, length: int, image_length: int) -> "_Axis":
        if self.resized is not None:
            raise _Unplannable("a second resampling")
        # The current window becomes the crop; a reversed interval resized is the resized interval reversed.
        offset = self.crop_length - self.window_start - self.length if self.flip else self.window_start
        start = self.crop_start + offset
        if start < 0 or start + self.length > image_length:
            raise _Unplannable("a padded crop before the resize")
        return _Axis(length, start, self.length, length, self.flip, 0)

    def plan(self) -> AxisPlan:
        return AxisPlan(self.crop_start, self.crop_length, self.domain, self.flip, self.window_start, self.length)


def batchable(ops: Sequence[Callable]) -> bool:
    """Whether every op is a crop, a bilinear antialiased resize or a flip, with at most one resampling."""
    resampling = [op for op in ops if isinstance(op, _RESAMPLING)]
    known = all(isinstance(op, _RESAMPLING + _MOVING) for op in ops)
    # torchvision keeps the interpolation as an InterpolationMode or as its value, by version.
    bilinear = all(v2.InterpolationMode(op.interpolation) == v2.InterpolationMode.BILINEAR and op.antialias for op in resampling)
    return known and bilinear and len(resampling) <= 1


def _resized_crop_box(op: v2.RandomResizedCrop, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """``op.make_params`` with ``generator``: the same draws in the same order, so the same box for a seed."""
    area = height * width
    log_ratio = torch.log(torch.tensor(op.ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(op.scale[0], op.scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # torchvision's fallback: the central crop
    if in_ratio < min(op.ratio):
        w, h = width, int(round(width / min(op.ratio)))
    elif in_ratio > max(op.ratio):
        w, h = int(round(height * max(op.ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _centre_start(length: int, crop: int) -> int:
    """Where ``F.center_crop`` starts along an axis; negative where it pads."""
    if crop > length:
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


def _apply(op: Callable, rows: _Axis, cols: _Axis, generator: torch.Generator, sizes: tuple[int, int]) -> tuple[_Axis, _Axis]:
    height, width = rows.length, cols.length
    if isinstance(op, v2.RandomResizedCrop):
        top, left, h, w = _resized_crop_box(op, height, width, generator)
        return rows.window(top, h).resize(op.size[0], sizes[0]), cols.window(left, w).resize(op.size[1], sizes[1])
    if isinstance(op, v2.Resize):
        new_height, new_width = _compute_resized_output_size((height, width), op.size, op.max_size)
        return rows.resize(new_height, sizes[0]), cols.resize(new_width, sizes[1])
    if isinstance(op, v2.CenterCrop):
        h, w = op.size
        return rows.window(_centre_start(height, h), h), cols.window(_centre_start(width, w), w)
    if isinstance(op, FiveCropCorner):
        top, left = op.anchor(height, width)
        return rows.window(top, op.size), cols.window(left, op.size)
    # The flips draw their coin as _RandomApplyTransform.forward does: flip unless rand >= p.
    flip = torch.rand(1, generator=generator).item() < op.p
    if isinstance(op, v2.RandomHorizontalFlip):
        return rows, cols.flipped() if flip else cols
    return (rows.flipped() if flip else rows), cols


def plan_geometry(ops: Sequence[Callable], height: int, width: int, size: int, seed: int | None) -> Plan | None:
    """The plan of ``ops`` (see :func:`batchable`) on a ``height x width`` image, ending at ``size x size``.

    ``seed`` seeds the draws as :class:`~herbarium.data.dataset.ImageDataset`
    seeds the CPU path's; ``None``: unseeded (fresh entropy, not the global
    generator). Returns ``None`` for a chain no plan describes on this image
    (the caller transforms that batch image by image).
    """
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    rows, cols = _Axis(height, 0, height), _Axis(width, 0, width)
    try:
        for op in ops:
            rows, cols = _apply(op, rows, cols, generator, (height, width))
            if rows.length < 1 or cols.length < 1:
                return None
        # As the per-image path does, an output that is not size x size is resized to it.
        rows = rows if rows.length == size else rows.resize(size, height)
        cols = cols if cols.length == size else cols.resize(size, width)
    except (_Unplannable, ValueError):
        return None
    return Plan(rows.plan(), cols.plan())
