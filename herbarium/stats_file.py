"""Reading the stats file that ``collect-stats`` writes (mean/std and class counts)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_FILE_NAME = "stats.json"


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std in [0, 1] pixel units, and where they came from."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = "imagenet"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


_warned_imagenet = False


def imagenet_normalization() -> Normalization:
    return Normalization(IMAGENET_MEAN, IMAGENET_STD, "imagenet")


def read_normalization(path: str | Path | None) -> Normalization:
    """Mean/std from a stats file, or the ImageNet values with one warning per process.

    The Herbarium 2020 seed measured a small gain from the dataset's own
    statistics over the ImageNet ones, so a missing file is worth a warning.
    """
    global _warned_imagenet
    if path is not None and Path(path).is_file():
        try:
            data = json.loads(Path(path).read_text())
            mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
        except (KeyError, TypeError, ValueError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a stats file written by collect-stats ({error})") from None
        if len(mean) != 3 or len(std) != 3 or not all(map(math.isfinite, mean + std)) or min(std) <= 0:
            raise ValueError(f"{path}: mean and std must be 3 finite channels with std > 0, got {mean}, {std}")
        return Normalization(mean, std, str(path), data)
    if not _warned_imagenet:
        where = f" ({path} not found)" if path else ""
        warnings.warn(f"no stats file{where}: normalising with the ImageNet mean/std; run collect-stats for the dataset's own", stacklevel=2)
        _warned_imagenet = True
    return imagenet_normalization()


def default_stats_path(data: str | Path, split: str = "train") -> Path:
    """Where collect-stats writes by default and training looks: ``DATA/<split>/stats.json`` or ``DATA/stats.json``."""
    data = Path(data)
    split_dir = data / split
    return split_dir / STATS_FILE_NAME if split_dir.is_dir() else data / STATS_FILE_NAME
