"""Tests for the TTA view vocabulary of herbarium/evaluation/tta.py: multi-scale, five-crop, named sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from herbarium import engine
from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from herbarium.data.dataset import ImageDataset
from herbarium.data.readers import read_split
from herbarium.data.transforms import eval_transform, resize_size
from herbarium.demo import make_demo_data
from herbarium.evaluation.runner import evaluate
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.evaluation.tta import (
    DEFAULT_VIEWS,
    FIVECROP_CORNERS,
    InputProfile,
    MultiViewDataset,
    collate_views,
    parse_views,
    plain_view_index,
    scaled_resize_size,
    view_decode_side,
    view_transform,
)
from herbarium.models.config import ModelConfig

SIZE = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
PROFILE = InputProfile(SIZE, MEAN, STD, "crop_flip")


@pytest.fixture
def image() -> Image.Image:
    """Non-square, with every pixel different enough that crops and zooms are told apart."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(20, 235, (45, 61, 3), dtype=np.uint8))


def _normalise(tensor: torch.Tensor) -> torch.Tensor:
    return F.normalize(F.to_dtype(F.to_image(tensor), torch.float32, scale=True), list(MEAN), list(STD))


# ------------------------------------------------------------------ parsing
def test_fivecrop_expands_to_five_views_with_plain_as_the_centre():
    views = parse_views("fivecrop")
    assert views == (*FIVECROP_CORNERS, "plain") and len(views) == 5 and len(set(views)) == 5
    assert plain_view_index(views) == 4


def test_named_sets_and_mixed_lists():
    assert parse_views("multiscale") == ("plain", "scale:0.875", "scale:1.15")
    assert parse_views("fivecrop+flip") == (*FIVECROP_CORNERS, "plain", "flip")
    assert parse_views("multiscale,flip") == ("plain", "scale:0.875", "scale:1.15", "flip")
    assert parse_views(["fivecrop", "train"]) == (*FIVECROP_CORNERS, "plain", "train")
    assert parse_views("4") == DEFAULT_VIEWS == ("train", "train", "train", "plain")
    assert parse_views("plain, scale:1.3 ,flip") == ("plain", "scale:1.3", "flip")


@pytest.mark.parametrize("spec, message", [
    ("zoom", r"unknown TTA view 'zoom'; views: plain, flip, train, scale:F"),
    ("plain,fivecrop:middle", r"unknown TTA view 'fivecrop:middle'"),
    ("scale:0", r"'scale:0': the scale must be a number > 0"),
    ("scale:-1", r"'scale:-1'"),
    ("scale:big", r"'scale:big'"),
    ("scale:nan", r"'scale:nan'"),
    (",", r"no TTA views"),
    ("0", r"at least 1"),
])
def test_bad_views_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_views(spec)


def test_a_set_name_cannot_reach_the_transforms_unexpanded():
    with pytest.raises(ValueError, match="'fivecrop' stands for several views"):
        view_transform("fivecrop", PROFILE)


# ------------------------------------------------------------------- views
def test_scale_one_equals_plain(image):
    plain = view_transform("plain", PROFILE)(image)
    assert torch.equal(view_transform("scale:1.0", PROFILE)(image), plain)
    assert torch.equal(view_transform("scale:1", PROFILE)(image), plain)
    assert torch.equal(plain, eval_transform(SIZE, MEAN, STD)(image))


@pytest.mark.parametrize("factor", [0.95, 1.15, 1.5])
def test_scale_resizes_the_shorter_side_then_centre_crops(image, factor):
    side = math.floor(SIZE * factor / 0.875)
    assert scaled_resize_size(SIZE, factor) == side
    expected = _normalise(F.center_crop(F.resize(F.pil_to_tensor(image), side, antialias=True), [SIZE, SIZE]))
    got = view_transform(f"scale:{factor}", PROFILE)(image)
    assert got.shape == (3, SIZE, SIZE)
    assert torch.allclose(got, expected, atol=0.1)  # PIL and tensor resampling differ by a few grey levels
    assert not torch.allclose(got, view_transform("plain", PROFILE)(image), atol=0.1)


def test_scale_below_crop_pct_pads_with_black(image):
    """scale:0.5 shows the whole image, smaller than the input, padded with black as CenterCrop pads."""
    side = scaled_resize_size(SIZE, 0.5)
    assert side == math.floor(SIZE * 0.5 / 0.875) == 18
    resized = F.pil_to_tensor(F.resize(image, side, antialias=True))  # [3, 18, 24]: the whole image
    got = view_transform("scale:0.5", PROFILE)(image)
    assert torch.allclose(got, _normalise(F.center_crop(resized, [SIZE, SIZE])), atol=1e-6)
    black = _normalise(torch.zeros(3, 1, 1, dtype=torch.uint8))
    top, left = (SIZE - 18) // 2, (SIZE - 24) // 2
    assert torch.equal(got[:, :top], black.expand(3, top, SIZE))
    assert torch.equal(got[:, :, :left], black.expand(3, SIZE, left))
    assert torch.allclose(got[:, top:top + 18, left:left + 24], _normalise(resized), atol=1e-6)


def test_fivecrop_views_are_torchvision_fivecrop_of_the_eval_resize(image):
    resized = F.resize(image, resize_size(SIZE), antialias=True)
    expected = [_normalise(F.pil_to_tensor(crop)) for crop in F.five_crop(resized, [SIZE, SIZE])]
    views = parse_views("fivecrop")
    got = [view_transform(view, PROFILE)(image) for view in views]
    for view, tensor, reference in zip(views, got, expected):
        assert torch.allclose(tensor, reference, atol=1e-6), view
    assert len({tuple(t.flatten()[:50].tolist()) for t in got}) == 5  # five different crops


def test_decode_side_covers_every_view():
    assert view_decode_side("plain", 224) == view_decode_side("fivecrop:top_left", 224) == resize_size(224) == 256
    assert view_decode_side("scale:1.15", 224) == math.floor(224 * 1.15 / 0.875) == 294
    assert view_decode_side("train", 224) == 448


# ----------------------------------------------------------------- dataset
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("views") / "demo"
    make_demo_data(out, image_size=SIZE, max_per_class=6, min_per_class=2, test_per_class=2)
    return out


def test_multi_view_dataset_stacks_every_view_set(demo):
    split = read_split(demo, "test")
    images = ImageDataset(split, ("species",), transform=lambda image: image)
    plain = eval_transform(SIZE, MEAN, STD)(images.read_image(1))
    for spec, count in (("multiscale", 3), ("fivecrop+flip", 6), ("fivecrop,multiscale,train", 9)):
        views = parse_views(spec)
        dataset = MultiViewDataset(images, views, [PROFILE])
        batch = collate_views([dataset[0], dataset[1]])
        assert batch["views"][0].shape == (2, count, 3, SIZE, SIZE)
        assert torch.equal(batch["views"][0][1, plain_view_index(views)], plain)


def test_evaluate_with_fivecrop_and_flip(demo, tmp_path):
    cfg = TrainConfig(
        out=str(tmp_path / "run"), epochs=1, seed=0, device="cpu",
        data=DataConfig(data=str(demo), val_split="test", size=SIZE, batch_size=16, workers=0),
        model=ModelConfig(pretrained=False, trunk="resnet10t", dropout=0.0),
        loss=LossConfig(levels=("species", "genus", "family")),
        optim=OptimConfig(optim="adam@2e-3:0", schedule="constant"),
    )
    engine.train(cfg)
    views = parse_views("fivecrop+flip")
    settings = EvaluationSettings(views=views, workers=0, device="cpu", batch_size=8)
    result = evaluate([tmp_path / "run"], demo, "test", out=tmp_path / "eval", settings=settings)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["throughput"]["views"] == 6
    # The fivecrop centre is `plain`, so the single-view baseline is the plain-only evaluation.
    plain_only = evaluate([tmp_path / "run"], demo, "test", out=tmp_path / "plain",
                          settings=EvaluationSettings(views=("plain",), workers=0, device="cpu", batch_size=8))
    for rank in ("species", "genus", "family"):
        single = result["metrics"]["variants"]["single_view_heads"][rank]
        assert single == plain_only["metrics"]["variants"]["tta_heads"][rank]
        assert metrics["variants"]["single_view_heads"][rank]["top1"] == pytest.approx(single["top1"])
