"""Evaluation transform and tensor conversion on PIL images (the CPU input path), torchvision v2."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torchvision.transforms import v2

DEFAULT_CROP_PCT = 0.875


def resize_size(size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Shorter side before the centre crop, as in timm's eval transform."""
    return int(math.floor(size / crop_pct))


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def stats_transform(size: int) -> v2.Compose:
    """The pixels collect-stats measures: shorter side to ``size``, centre crop, [0, 1] float32."""
    return v2.Compose([
        v2.Resize(size, antialias=True),
        v2.CenterCrop(size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
    ])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = DEFAULT_CROP_PCT) -> v2.Compose:
    """Resize the shorter side to size / crop_pct, then centre-crop ``size``."""
    return v2.Compose([
        v2.Resize(resize_size(size, crop_pct), antialias=True),
        v2.CenterCrop(size),
        to_normalized_tensor(mean, std),
    ])


class FiveCropCorner(v2.Transform):
    """One of torchvision's five crops of ``size x size``: ``corner`` 0-3 top-left, top-right, bottom-left, bottom-right.

    A transform of its own (not a ``Lambda``) so that the batched device path
    can read where it cuts (:meth:`anchor`).
    """

    CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

    def __init__(self, size: int, corner: int) -> None:
        super().__init__()
        self.size, self.corner = size, corner

    def anchor(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the crop; ``ValueError`` when the image is smaller than the crop, as ``five_crop`` raises."""
        if self.size > height or self.size > width:
            raise ValueError(f"Requested crop size {[self.size, self.size]} is bigger than input size {(height, width)}")
        return (0 if self.corner < 2 else height - self.size), (0 if self.corner % 2 == 0 else width - self.size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return v2.functional.five_crop(inpt, [self.size, self.size])[self.corner]
