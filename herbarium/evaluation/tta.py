"""Test-time augmentation views: a small vocabulary and a dataset that yields them all at once.

The Herbarium 2020 seed sampled 4 inputs per test image: three with the
training augmentation and one plain resize, and averaged their logits. The
default here is the same (``train,train,train,plain``). Each image is decoded
once and all its views are returned together, so the model sees every view
of a batch in one forward pass.

View names:

* ``plain``: resize the shorter side to size / crop_pct and centre-crop.
* ``flip``: ``plain`` mirrored.
* ``train``: the run's training augmentation, seeded per image and view so
  evaluations are repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from herbarium.data.augment import build_train_transform
from herbarium.data.dataset import ImageDataset
from herbarium.data.transforms import eval_transform

PLAIN = "plain"
DEFAULT_VIEWS = ("train", "train", "train", PLAIN)


def parse_views(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"4"`` -> three ``train`` views and one ``plain``; ``"plain,flip"`` -> as written."""
    if not isinstance(spec, str):
        return tuple(spec)
    if spec.strip().isdigit():
        count = int(spec)
        if count < 1:
            raise ValueError("the number of TTA views must be at least 1")
        return ("train",) * (count - 1) + (PLAIN,)
    views = tuple(part.strip() for part in spec.split(",") if part.strip())
    if not views:
        raise ValueError(f"no TTA views in {spec!r}")
    return views


@dataclass(frozen=True)
class InputProfile:
    """How one model wants its input: size, normalisation and training augmentation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str


def view_transform(view: str, profile: InputProfile) -> Callable[[Any], torch.Tensor]:
    builders: dict[str, Callable[[], Callable[[Any], torch.Tensor]]] = {
        PLAIN: lambda: eval_transform(profile.size, profile.mean, profile.std),
        "flip": lambda: v2.Compose([v2.RandomHorizontalFlip(p=1.0), eval_transform(profile.size, profile.mean, profile.std)]),
        "train": lambda: build_train_transform(profile.augment, profile.size, profile.mean, profile.std),
    }
    if view not in builders:
        raise ValueError(f"unknown TTA view {view!r}; choose from {sorted(builders)}")
    return builders[view]()


def plain_view_index(views: Sequence[str]) -> int | None:
    """Which view is the single-view baseline (the first plain one), if any."""
    return views.index(PLAIN) if PLAIN in views else None


class MultiViewDataset(Dataset):
    """Every TTA view of an image, for every input profile: ``{"views": [P x Tensor[V,3,H,W]], ...}``.

    Randomised views are seeded by ``(seed, index, view)``, so a second
    evaluation of the same checkpoint gives the same numbers.
    """

    def __init__(self, images: ImageDataset, views: Sequence[str], profiles: Sequence[InputProfile], seed: int = 0) -> None:
        self.images = images
        self.views = tuple(views)
        self.transforms = [[view_transform(view, profile) for view in self.views] for profile in profiles]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self.images.read_image(index)
        if image is None:
            return None
        stacks = []
        with torch.random.fork_rng(devices=[]):
            for transforms in self.transforms:
                tensors = []
                for view_number, transform in enumerate(transforms):
                    torch.manual_seed(hash((self.seed, index, view_number)) & 0x7FFFFFFF)
                    tensors.append(transform(image))
                stacks.append(torch.stack(tensors))
        return {"views": stacks, "targets": self.images.targets[index], "index": index}


def collate_views(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack per profile: ``views[p]`` is [B, V, 3, H, W]; unreadable images are counted."""
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {"skipped": len(items) - len(kept)}
    if kept:
        batch["views"] = [torch.stack([item["views"][p] for item in kept]) for p in range(len(kept[0]["views"]))]
        batch["targets"] = torch.stack([item["targets"] for item in kept])
        batch["index"] = torch.tensor([item["index"] for item in kept], dtype=torch.long)
    return batch
