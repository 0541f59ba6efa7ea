"""Test-time augmentation views: a small vocabulary and a dataset that yields them all at once.

The Herbarium 2020 seed sampled 4 inputs per test image: three with the
training augmentation and one plain resize, and averaged their logits. The
default here is the same (``train,train,train,plain``). Each image is decoded
once and all its views are returned together, so the model sees every view
of a batch in one forward pass; every view is therefore ``size x size``.

View names (``crop_pct`` is 0.875, as in timm's evaluation transform):

* ``plain``: resize the shorter side to size / crop_pct and centre-crop ``size``.
* ``flip``: ``plain`` mirrored.
* ``train``: the run's training augmentation preset, seeded per image and
  view so evaluations are repeatable.
* ``scale:F`` (F > 0): multi-scale at a fixed input size, the ``plain``
  transform with crop_pct / F. Resize the shorter side to
  floor(size * F / crop_pct) and centre-crop ``size``: F > 1 zooms in (more
  detail, less context), F < 1 zooms out (more of the image). Below
  F = crop_pct the resized side is shorter than ``size`` and the centre
  crop pads it with black, as torchvision's CenterCrop does. ``scale:1`` is
  ``plain``. The AliProducts solution used multi-scale crops; fixed-size
  zooms keep the views of a batch stackable.
* ``fivecrop``: expands to five views, torchvision's FiveCrop of the
  size / crop_pct resize: ``fivecrop:top_left``, ``fivecrop:top_right``,
  ``fivecrop:bottom_left``, ``fivecrop:bottom_right`` and the centre crop,
  which is exactly ``plain`` and is named so (it is then also the
  single-view baseline of the report).

Every view is resizing and cropping followed by the conversion to a
normalised tensor, so the GPU input path can run the same ops on decoded
tensors and normalise afterwards.

Named sets, usable alone or inside a list: ``multiscale`` =
``plain,scale:0.875,scale:1.15``; ``fivecrop+flip`` = the five crops and
``flip``. A number N means N-1 ``train`` views and one ``plain``.

To compare view sets on the same run, evaluate it once per set into
separate folders and compare their ``metrics.json`` (each also holds the
single-view ``plain`` baseline when the set contains ``plain``)::

    tta_eval.py RUN --data DATA --views 4 --out RUN/eval/views_default
    tta_eval.py RUN --data DATA --views multiscale --out RUN/eval/views_multiscale
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from herbarium.data.augment import build_train_transform
from herbarium.data.dataset import ImageDataset
from herbarium.data.seeding import seeded, view_seed
from herbarium.data.transforms import DEFAULT_CROP_PCT, FiveCropCorner, eval_transform, resize_size, to_normalized_tensor

PLAIN = "plain"
FLIP = "flip"
TRAIN = "train"
SCALE = "scale"
FIVECROP = "fivecrop"
# FiveCrop's order is (top-left, top-right, bottom-left, bottom-right, centre); the centre is `plain`.
FIVECROP_CORNERS = tuple(f"{FIVECROP}:{corner}" for corner in ("top_left", "top_right", "bottom_left", "bottom_right"))
DEFAULT_VIEWS = (TRAIN, TRAIN, TRAIN, PLAIN)
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "multiscale": (PLAIN, f"{SCALE}:0.875", f"{SCALE}:1.15"),
    "fivecrop+flip": (FIVECROP, FLIP),
}
VIEW_VOCABULARY = (f"{PLAIN}, {FLIP}, {TRAIN}, {SCALE}:F (F > 0), {FIVECROP} (5 views: {', '.join(FIVECROP_CORNERS)}, "
                   f"{PLAIN}); named sets: {', '.join(VIEW_SETS)}; or a number N (N-1 {TRAIN} + {PLAIN})")


def _expand(token: str) -> tuple[str, ...]:
    if token in VIEW_SETS:
        return tuple(view for part in VIEW_SETS[token] for view in _expand(part))
    if token == FIVECROP:
        return (*FIVECROP_CORNERS, PLAIN)
    check_view(token)
    return (token,)


def parse_views(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"4"`` -> three ``train`` views and one ``plain``; ``"plain,fivecrop"`` -> plain and the five crops.

    Named sets and ``fivecrop`` are expanded, so every returned name is a
    single view; an unknown view raises ``ValueError`` listing the vocabulary.
    """
    if isinstance(spec, str):
        if spec.strip().isdigit():
            count = int(spec)
            if count < 1:
                raise ValueError("the number of TTA views must be at least 1")
            return (TRAIN,) * (count - 1) + (PLAIN,)
        tokens = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        tokens = list(spec)
    views = tuple(view for token in tokens for view in _expand(token))
    if not views:
        raise ValueError(f"no TTA views in {spec!r}")
    return views


def scale_factor(view: str) -> float:
    """F of a ``scale:F`` view."""
    text = view.partition(":")[2]
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"TTA view {view!r}: the scale must be a number > 0, e.g. {SCALE}:1.15")
    return factor


def check_view(view: str) -> None:
    """Raise ``ValueError`` naming the view and the vocabulary unless ``view`` is a single known view."""
    if view in (PLAIN, FLIP, TRAIN) or view in FIVECROP_CORNERS:
        return
    if view.startswith(f"{SCALE}:"):
        scale_factor(view)
        return
    if view == FIVECROP or view in VIEW_SETS:
        raise ValueError(f"TTA view {view!r} stands for several views; expand it with parse_views")
    raise ValueError(f"unknown TTA view {view!r}; views: {VIEW_VOCABULARY}")


def scaled_crop_pct(factor: float) -> float:
    """The crop_pct of a ``scale:F`` view: the plain view's divided by F."""
    return DEFAULT_CROP_PCT / factor


def scaled_resize_size(size: int, factor: float) -> int:
    """Shorter side of a ``scale:F`` view before its centre crop: floor(size * F / crop_pct)."""
    return max(1, resize_size(size, scaled_crop_pct(factor)))


def view_decode_side(view: str, size: int) -> int:
    """The shorter side a view needs from the decoder (draft-mode JPEG decoding must not go below it).

    ``train`` asks for what training decodes (2 x size, as the engine's loader does).
    """
    check_view(view)
    if view == TRAIN:
        return 2 * size
    if view.startswith(f"{SCALE}:"):
        return scaled_resize_size(size, scale_factor(view))
    return resize_size(size)


@dataclass(frozen=True)
class InputProfile:
    """How one model wants its input: size, normalisation and training augmentation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str


def view_transform(view: str, profile: InputProfile) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised float tensor [3, size, size] for one single view."""
    check_view(view)
    size, mean, std = profile.size, profile.mean, profile.std
    if view == PLAIN:
        return eval_transform(size, mean, std)
    if view == FLIP:
        return v2.Compose([v2.RandomHorizontalFlip(p=1.0), eval_transform(size, mean, std)])
    if view == TRAIN:
        return build_train_transform(profile.augment, size, mean, std)
    if view in FIVECROP_CORNERS:
        corner = FiveCropCorner(size, FIVECROP_CORNERS.index(view))
        return v2.Compose([v2.Resize(resize_size(size), antialias=True), corner, to_normalized_tensor(mean, std)])
    return eval_transform(size, mean, std, crop_pct=scaled_crop_pct(scale_factor(view)))


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
        for transforms in self.transforms:
            tensors = []
            for view_number, transform in enumerate(transforms):
                with seeded(view_seed(self.seed, index, view_number)):
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
