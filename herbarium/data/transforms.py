"""Evaluation transform and tensor conversion on PIL images (the CPU input path), torchvision v2."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision.transforms import v2

DEFAULT_CROP_PCT = 0.875


def resize_size(size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Shorter side before the centre crop, as in timm's eval transform."""
    return int(math.floor(size / crop_pct))


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = DEFAULT_CROP_PCT) -> v2.Compose:
    """Resize the shorter side to size / crop_pct, then centre-crop ``size``."""
    return v2.Compose([
        v2.Resize(resize_size(size, crop_pct), antialias=True),
        v2.CenterCrop(size),
        to_normalized_tensor(mean, std),
    ])
