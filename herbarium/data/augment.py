"""Named augmentation presets for training, on the CPU input path."""

from __future__ import annotations

from typing import Callable, Sequence

from torchvision.transforms import v2

from herbarium.data.transforms import to_normalized_tensor


def _crop_flip(size: int) -> list:
    """Random resized crop + horizontal flip (the Herbarium 2020 seed: these help, colour jitter does not)."""
    return [v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]


TRAIN_PRESETS: dict[str, Callable[[int], list]] = {
    "crop_flip": _crop_flip,
}


def build_train_transform(preset: str, size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    return v2.Compose([*TRAIN_PRESETS[preset](size), to_normalized_tensor(mean, std)])
