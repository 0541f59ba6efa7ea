"""Named augmentation presets for training and test-time views, built from torchvision transforms v2.

A preset turns an RGB image into a ``size x size`` image in the same dtype,
not yet normalised. The same preset objects run on both input paths:

* the CPU path gives them PIL images, and :func:`build_train_transform`
  appends the conversion to a normalised float tensor;
* the GPU path gives them decoded uint8 (or float in [0, 1]) CHW tensors on
  any device, one image at a time, via :func:`preset_ops`, and converts and
  normalises the result itself.

Order inside a preset: the geometric ops first (they work on PIL images and
tensors alike and fix the final frame), then, where a preset erases,
``v2.ToImage()`` and ``RandomErasing`` last. ``ToImage`` turns a PIL image
into a uint8 tensor and leaves a tensor as it is (same dtype, same device),
so one list serves both paths, and erasing a tensor spares the PIL -> tensor
-> PIL round trip torchvision makes to erase a PIL image. Erasing comes
before normalisation and writes 0 (black), which reads the same in uint8
and in float [0, 1]; erasing after ``Normalize`` (as timm does) would give
a different colour on a path that normalises elsewhere. Pixels a rotation
or a perspective brings in from outside the image are 0 as well.

Random parameters come from the global torch RNG; the dataset seeds it per
sample, so an augmented image is a function of its sampler key.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

from torchvision.transforms import v2

from herbarium.data.transforms import resize_size, to_normalized_tensor

CROP_SCALE = (0.25, 1.0)  # area fraction of RandomResizedCrop
ERASING = dict(p=0.5, scale=(0.02, 0.25), ratio=(0.3, 3.3), value=0)
BILINEAR = v2.InterpolationMode.BILINEAR


def _crop_flip(size: int) -> list[v2.Transform]:
    """Random resized crop (25-100% of the area, aspect 3/4-4/3) and horizontal flip.
    The Herbarium 2020 seed found that random crops and flips help on herbarium
    sheets while colour jitter does not. The default: start here on a new dataset."""
    return [v2.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True), v2.RandomHorizontalFlip()]


def _shift_scale_rotate_cutout(size: int) -> list[v2.Transform]:
    """Resize the shorter side to size / crop_pct, shift (up to 6.25%), scale (0.9-1.1) and
    rotate (up to 20 degrees) with RandomAffine, centre-crop ``size``, flip, then Cutout as
    RandomErasing (p=0.5, 2-25% of the area, black). The Shopee product-categorization 7th
    place recipe (shift/rotate/scale and Cutout; the flip is added here). It keeps the eval
    framing: for centred objects whose position and orientation vary, and against
    overfitting when classes have few images."""
    return [
        v2.Resize(resize_size(size), antialias=True),
        v2.RandomAffine(degrees=20, translate=(0.0625, 0.0625), scale=(0.9, 1.1), interpolation=BILINEAR),
        v2.CenterCrop(size),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.RandomErasing(**ERASING),
    ]


def _perspective_erasing(size: int) -> list[v2.Transform]:
    """``crop_flip`` followed by RandomPerspective (distortion 0.3, p=0.5) and RandomErasing
    (p=0.5, 2-25% of the area, black). The AliProducts solution added cutout and perspective
    transforms against overfitting on classes with few, noisy product photos. Use it when
    objects are photographed from varying viewpoints and the training loss falls far below
    the validation loss."""
    return [
        *_crop_flip(size),
        v2.RandomPerspective(distortion_scale=0.3, p=0.5, interpolation=BILINEAR),
        v2.ToImage(),
        v2.RandomErasing(**ERASING),
    ]


def _square_resize(size: int) -> list[v2.Transform]:
    """Resize the whole image to ``size x size`` without cropping (the aspect ratio is not
    kept) and flip horizontally. The Herbarium 2022 winner's input: nothing at the sheet's
    edges (labels, small specimens) is ever cropped away. Use it when the informative parts
    may lie anywhere in the image."""
    return [v2.Resize((size, size), antialias=True), v2.RandomHorizontalFlip()]


def _crop_flip_trivial(size: int) -> list[v2.Transform]:
    """``crop_flip`` followed by TrivialAugmentWide (one random colour or geometric op per image at a
    random strength; Muller and Hutter 2021): timm users' strong default with no settings to tune.
    Try it when classes have few images and the model overfits within a few epochs."""
    return [*_crop_flip(size), v2.TrivialAugmentWide(interpolation=BILINEAR)]


def _crop_flip_randaugment(size: int) -> list[v2.Transform]:
    """``crop_flip`` followed by RandAugment (2 random ops at magnitude 9 of 31; Cubuk et al. 2020),
    the timm ``rand-m9-n2`` policy. A stronger, fixed-strength alternative to ``crop_flip_trivial``."""
    return [*_crop_flip(size), v2.RandAugment(num_ops=2, magnitude=9, interpolation=BILINEAR)]


def _crop_flip_erasing(size: int) -> list[v2.Transform]:
    """``crop_flip`` followed by RandomErasing (p=0.5, 2-25% of the area, black; Zhong et al.
    2020), as timm's ``--reprob``: teaches the model not to rely on one part of the object."""
    return [*_crop_flip(size), v2.ToImage(), v2.RandomErasing(**ERASING)]


def _none(size: int) -> list[v2.Transform]:
    """No augmentation: resize the shorter side to size / crop_pct and centre-crop ``size``,
    exactly the evaluation view. A baseline, and for fine-tuning or feature extraction
    where the training input should look like the test input."""
    return [v2.Resize(resize_size(size), antialias=True), v2.CenterCrop(size)]


@dataclass(frozen=True)
class Preset:
    """A named augmentation: where it comes from and when to use it, and a builder of its ops for a size."""

    description: str
    build: Callable[[int], list[v2.Transform]]


def _preset(build: Callable[[int], list[v2.Transform]]) -> Preset:
    return Preset(" ".join(inspect.getdoc(build).split()), build)


PRESETS: dict[str, Preset] = {
    "crop_flip": _preset(_crop_flip),
    "shift_scale_rotate_cutout": _preset(_shift_scale_rotate_cutout),
    "perspective_erasing": _preset(_perspective_erasing),
    "square_resize": _preset(_square_resize),
    "crop_flip_trivial": _preset(_crop_flip_trivial),
    "crop_flip_randaugment": _preset(_crop_flip_randaugment),
    "crop_flip_erasing": _preset(_crop_flip_erasing),
    "none": _preset(_none),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def preset_ops(preset: str, size: int) -> list[v2.Transform]:
    """The preset's geometric/photometric ops: RGB image (PIL, or CHW tensor on any device) -> ``size x size``.

    No dtype conversion and no normalisation: a uint8 tensor stays uint8. A
    preset that erases ends with ``ToImage`` and ``RandomErasing`` (see the
    module docstring), so its output is a tensor even for a PIL input.
    """
    if size < 1:
        raise ValueError(f"augmentation size must be at least 1 pixel, got {size}")
    return get_preset(preset).build(size)


def build_train_transform(preset: str, size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The preset's ops, then conversion to a float tensor [3, size, size] normalised with ``mean``/``std``."""
    return v2.Compose([*preset_ops(preset, size), to_normalized_tensor(mean, std)])


def describe_presets(separator: str = "\n") -> str:
    """Each preset with what it does, for ``--augment``'s help."""
    return separator.join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
