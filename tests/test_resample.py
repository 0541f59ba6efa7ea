"""Tests for herbarium/data/resample.py: the batched weighted sums give torchvision's per-image pixels."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from herbarium.data.augment import preset_ops
from herbarium.data.geometry import plan_geometry
from herbarium.data.resample import axis_numbers, draft_weights, filter_weights, pad_batch, resample
from herbarium.data.transforms import FiveCropCorner

SIZE = 16
CHAINS = {
    "crop_flip": preset_ops("crop_flip", SIZE),
    "square_resize": preset_ops("square_resize", SIZE),
    "none": preset_ops("none", SIZE),
    "flip view": [v2.RandomHorizontalFlip(p=1.0), v2.Resize(18), v2.CenterCrop(SIZE)],
    "zoomed out (padded)": [v2.Resize(12), v2.CenterCrop(SIZE)],
    "top right": [v2.Resize(18), FiveCropCorner(SIZE, 1)],
    "bottom right": [v2.Resize(18), FiveCropCorner(SIZE, 3)],
    "vertical flip": [v2.RandomVerticalFlip(p=1.0), v2.Resize(SIZE), v2.CenterCrop(SIZE)],
    "upsampled": [v2.Resize(80), v2.CenterCrop(SIZE)],
}


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    """Smooth images of varied sizes, as photographs are: detail at a few pixels, not pixel noise."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        height, width = 40 + 7 * i, 60 - 3 * i
        coarse = torch.rand(1, 3, height // 4 + 1, width // 4 + 1, generator=generator) * 255
        out.append(torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 255).round()[0]
                   .to(torch.uint8))
    return out


def _per_image(ops, images, seeds):
    outputs = []
    for image, seed in zip(images, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            output = v2.Compose(ops)(image)
        outputs.append(output if tuple(output.shape[-2:]) == (SIZE, SIZE) else F.resize(output, [SIZE, SIZE], antialias=True))
    return torch.stack(outputs).float()


def _batched(ops, images, seeds, dtype=torch.float32):
    plans = [plan_geometry(ops, image.shape[1], image.shape[2], SIZE, seed) for image, seed in zip(images, seeds)]
    padded = pad_batch(images, dtype)
    rows = filter_weights(axis_numbers([plan.rows for plan in plans], padded.device), SIZE, padded.shape[2])
    cols = filter_weights(axis_numbers([plan.cols for plan in plans], padded.device), SIZE, padded.shape[3])
    return resample(padded, rows[:, None], cols[:, None])[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16 (CUDA's)"])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_batched_pixels_are_torchvisions_per_image_pixels(images, chain, dtype):
    seeds = [100 + i for i in range(len(images))]
    difference = (_batched(CHAINS[chain], images, seeds, dtype).float() - _per_image(CHAINS[chain], images, seeds)).abs()
    # Grey levels: torchvision's fixed-point weights against ours. Measured: at most 1 level (2 upsampling);
    # on average 0.002-0.014 in float32 and 0.05-0.08 in float16 downsampling, 0.06 / 0.11 upsampling.
    assert difference.max() <= 2
    assert difference.mean() < (0.1 if dtype == torch.float32 else 0.15)


def test_pad_batch_pads_with_zeros(images):
    padded = pad_batch(images[:3])
    assert padded.shape == (3, 3, 54, 60) and padded.dtype == torch.float32
    assert torch.equal(padded[1, :, :47, :57], images[1].float()) and padded[1, :, 47:].abs().sum() == 0


def test_draft_weights_are_an_area_average():
    image = torch.rand(2, 3, 37, 53) * 255
    lengths, drafts = torch.tensor([37, 30]), torch.tensor([10, 15])
    rows = draft_weights(lengths, drafts, 37)
    cols = draft_weights(torch.tensor([53, 53]), torch.tensor([14, 7]), 53)
    assert rows.shape == (2, 15, 37)
    reduced = torch.matmul(torch.matmul(rows[:, None], image), cols[:, None].transpose(-1, -2))
    expected = torch.nn.functional.interpolate(image[:1], size=(10, 14), mode="area")
    torch.testing.assert_close(reduced[0, :, :10, :14], expected[0], rtol=0, atol=1e-3)
    assert reduced[0, :, 10:].abs().sum() == 0  # past the draft size: nothing
    expected = torch.nn.functional.interpolate(image[1:, :, :30], size=(15, 7), mode="area")
    torch.testing.assert_close(reduced[1, :, :15, :7], expected[0], rtol=0, atol=1e-3)
