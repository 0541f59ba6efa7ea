"""What :meth:`herbarium.api.Run.predict` accepts, turned into one item per image.

* file paths and PIL images: decoded, resized, cropped and normalised as
  the run's plain evaluation view (or the TTA views asked for);
* raw pixels, treated exactly like a PIL image: numpy ``uint8`` arrays
  ``[H, W, 3]`` or ``[N, H, W, 3]`` (the layout of PIL, OpenCV after BGR->RGB,
  imageio) and torch ``uint8`` tensors ``[3, H, W]`` or ``[N, 3, H, W]`` (the
  layout of ``torchvision.io.decode_image``);
* model input, fed to the model as it is: torch floating-point tensors
  ``[3, S, S]`` or ``[N, 3, S, S]``, already resized to the run's size ``S``
  and normalised with its mean/std (what ``run.transform`` returns). TTA
  views cannot be made from them.

The dtype decides: ``uint8`` means pixels, floating point means model input.
Anything else is refused with a message that says which is which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import to_pil_image

ImageInput = str | Path | Image.Image
# One image after as_inputs: a file or PIL image to transform, or a normalised tensor [3, S, S] to feed as it is.
Item = ImageInput | torch.Tensor

RULE = ("uint8 arrays [H, W, 3] / [N, H, W, 3] and uint8 tensors [3, H, W] / [N, 3, H, W] are pixels; float tensors "
        "[3, {size}, {size}] / [N, 3, {size}, {size}] are normalised model input (run.transform's output)")


def as_inputs(images: Any, size: int) -> list[Item]:
    """``images`` (one input or an iterable of inputs, see the module) as one item per image."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
        images = [images]
    items: list[Item] = []
    for image in images:
        items += _items(image, size)
    return items


def _items(image: Any, size: int) -> list[Item]:
    if isinstance(image, (str, Path, Image.Image)):
        return [image]
    if isinstance(image, np.ndarray):
        return _from_array(image, size)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image, size)
    raise TypeError(f"cannot predict a {type(image).__name__}: give file paths, PIL images, numpy arrays or tensors")


def _from_array(array: np.ndarray, size: int) -> list[Item]:
    if array.dtype != np.uint8 or array.shape[-1:] != (3,) or array.ndim not in (3, 4):
        raise ValueError(f"a numpy array of shape {list(array.shape)} and dtype {array.dtype}: {RULE.format(size=size)}")
    return [Image.fromarray(pixels, "RGB") for pixels in (array[None] if array.ndim == 3 else array)]


def _from_tensor(tensor: torch.Tensor, size: int) -> list[Item]:
    batch = tensor[None] if tensor.ndim == 3 else tensor
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"a tensor of shape {list(tensor.shape)}: {RULE.format(size=size)}")
    if tensor.dtype == torch.uint8:
        return [to_pil_image(pixels.cpu()) for pixels in batch]
    if tensor.is_floating_point() and tuple(batch.shape[2:]) == (size, size):
        return list(batch.float())
    raise ValueError(f"a {tensor.dtype} tensor of shape {list(tensor.shape)}: {RULE.format(size=size)}")


def split_inputs(items: Iterable[Item]) -> tuple[list[int], list[int]]:
    """(indices of the items to decode and transform, indices of the normalised tensors to feed as they are)."""
    items = list(items)
    ready = [index for index, item in enumerate(items) if isinstance(item, torch.Tensor)]
    taken = set(ready)
    return [index for index in range(len(items)) if index not in taken], ready
