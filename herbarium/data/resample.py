"""Crop, resize and flip a whole batch of differently sized images in a fixed number of device calls.

Along each axis, a sample's :class:`~herbarium.data.geometry.AxisPlan`
is linear: output position ``o`` is a weighted sum of input positions, with
the weights of the antialiased bilinear filter that torchvision and Pillow
use (a triangle as wide as the scale factor, centred on ``scale * (o +
0.5)`` in the crop, normalised over the crop), reversed by a flip, zero
where a centre crop pads. So a batch padded to one size becomes every
output by ``rows @ image @ cols^T`` with per-sample weight matrices, and the
matrices are built on the device from a handful of numbers per sample. The
same two products, with area-average weights, reproduce draft-mode
decoding (:func:`draft_weights`). No step loops over the images: the number
of kernels does not grow with the batch.

The products run in float32 (float16 on CUDA, :func:`compute_dtype`) and
are rounded to whole grey levels after each pass, as the uint8 per-image
resize does; the pixels differ from its by a grey level or two at most (its
weights are fixed-point).
"""

from __future__ import annotations

from typing import Sequence

import warnings

import torch

from herbarium.data.geometry import AxisPlan

# Strided nested tensors are only the container that pads a list of differently sized images in one call.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage", category=UserWarning)

# Tensors of the per-sample numbers of an axis, in this order.
_FIELDS = ("crop_start", "crop_length", "resized", "flip", "window_start")


def compute_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (tensor cores, half the memory), float32 elsewhere.

    Grey levels 0-255 are exact in float16 and the weights are kept to
    1/2048 of themselves; with float32 accumulation the sums land within
    0.2 of a level of the float32 ones, so rounding moves a pixel by one
    level at most (tests/test_resample.py measures it on the CPU).
    """
    return torch.float16 if device.type == "cuda" else torch.float32


def pad_batch(images: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [3, H_i, W_i] images (one device) -> [B, 3, max H, max W] of ``dtype``, zero-padded, in two calls."""
    return torch.nested.as_nested_tensor(list(images), dtype=dtype).to_padded_tensor(0.0)


def axis_numbers(plans: Sequence[AxisPlan], device: torch.device) -> dict[str, torch.Tensor]:
    """The plans' numbers as int64 tensors [N] on ``device``, built on the CPU and sent in one copy."""
    table = torch.tensor([[getattr(plan, name) for name in _FIELDS] for plan in plans], dtype=torch.long)
    table = table.to(device, non_blocking=True)
    return {name: table[:, column] for column, name in enumerate(_FIELDS)}


def filter_weights(numbers: dict[str, torch.Tensor], length: int, inputs: int) -> torch.Tensor:
    """[N, length, inputs] weights of ``window(flip(resize(crop(axis))))`` for an axis padded to ``inputs``."""
    crop_start, crop_length, resized = numbers["crop_start"], numbers["crop_length"], numbers["resized"]
    position = numbers["window_start"][:, None] + torch.arange(length, device=crop_start.device)  # [N, length]
    index = torch.where(numbers["flip"][:, None] != 0, resized[:, None] - 1 - position, position)  # on the resized axis
    inside = (index >= 0) & (index < resized[:, None])
    scale = crop_length.double() / resized.double()  # [N]
    support = scale.clamp(min=1.0).float()
    centre = (scale[:, None] * (index.double() + 0.5)).float()  # [N, length], in crop coordinates
    source = torch.arange(inputs, device=crop_start.device) - crop_start[:, None]  # [N, inputs], in crop coordinates
    distance = (source[:, None, :] + 0.5 - centre[:, :, None]).div_(support[:, None, None])  # [N, length, inputs]
    weights = distance.abs_().neg_().add_(1.0).clamp_(min=0.0)  # the triangle filter
    weights *= ((source >= 0) & (source < crop_length[:, None]))[:, None, :]
    weights /= weights.sum(dim=2, keepdim=True).clamp_(min=1e-12)
    return weights.mul_(inside[:, :, None])


def draft_weights(lengths: torch.Tensor, drafts: torch.Tensor, inputs: int) -> torch.Tensor:
    """[N, max draft, inputs] area-average weights from ``lengths`` [N] to ``drafts`` [N] pixels.

    The windows of ``interpolate(mode="area")`` (adaptive average pooling):
    output ``g`` averages inputs floor(g L / D) to ceil((g + 1) L / D) - 1.
    """
    outputs = torch.arange(int(drafts.max()), device=lengths.device)[None, :]  # [1, D]
    start = outputs * lengths[:, None] // drafts[:, None]  # [N, D]
    end = ((outputs + 1) * lengths[:, None] + drafts[:, None] - 1) // drafts[:, None]
    source = torch.arange(inputs, device=lengths.device)[None, None, :]
    window = (source >= start[:, :, None]) & (source < end[:, :, None]) & (outputs < drafts[:, None])[:, :, None]
    return window.float() / (end - start).clamp(min=1)[:, :, None].float()


def resample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *, round_between: bool = True) -> torch.Tensor:
    """[B, C, H, W] with weights rows [B, V, n, H] and cols [B, V, m, W] -> [B, V, C, n, m], whole grey levels.

    The products run in the images' dtype (:func:`compute_dtype`).

    Columns first, rounded to whole levels (``round_between``), then rows:
    the order and the rounding of Pillow's and torchvision's uint8 resize,
    so the pixels are theirs up to the last bit of their fixed-point weights
    (``interpolate(mode="area")`` rounds once, at the end). All ``V``
    outputs of an image (the TTA views) read its one copy in ``images``.
    """
    batch, views, m, width = cols.shape
    every_view = cols.permute(0, 3, 1, 2).reshape(batch, 1, width, views * m).to(images.dtype)  # [B, 1, W, V*m]
    wide = torch.matmul(images, every_view).unflatten(3, (views, m)).permute(0, 3, 1, 2, 4)  # [B, V, C, H, m]
    if round_between:
        wide = to_levels(wide)
    return to_levels(torch.matmul(rows[:, :, None].to(images.dtype), wide))  # [B, V, C, n, m]


def to_levels(pixels: torch.Tensor) -> torch.Tensor:
    """Round resampled pixels to whole grey levels in [0, 255], in place, as a uint8 resize would give."""
    return pixels.round_().clamp_(0.0, 255.0)
