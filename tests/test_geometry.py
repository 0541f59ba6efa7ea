"""Tests for herbarium/data/geometry.py: per-sample plans draw what the v2 ops draw, from a private generator."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from herbarium.data.augment import PRESETS, preset_ops
from herbarium.data.device_augment import tensor_ops
from herbarium.data.geometry import batchable, plan_geometry
from herbarium.data.transforms import FiveCropCorner
from herbarium.evaluation.tta import InputProfile, parse_views, view_transform

SIZE = 16


@pytest.mark.parametrize("height,width", [(40, 60), (300, 200), (17, 90)])
def test_a_plan_crops_the_box_the_cpu_path_draws_for_the_seed(height, width):
    crop, flip = preset_ops("crop_flip", SIZE)
    for seed in range(20):
        torch.manual_seed(seed)  # how ImageDataset seeds the CPU path
        box = crop.make_params([torch.empty(3, height, width)])
        flipped = bool(torch.rand(1) < flip.p)
        plan = plan_geometry([crop, flip], height, width, SIZE, seed)
        assert (plan.rows.crop_start, plan.rows.crop_length) == (box["top"], box["height"])
        assert (plan.cols.crop_start, plan.cols.crop_length) == (box["left"], box["width"])
        assert plan.rows.resized == plan.cols.resized == plan.rows.length == plan.cols.length == SIZE
        assert plan.cols.flip == flipped and not plan.rows.flip


def test_planning_leaves_the_global_generator_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    plan_geometry(preset_ops("crop_flip", SIZE), 40, 60, SIZE, 7)
    plan_geometry(preset_ops("crop_flip", SIZE), 40, 60, SIZE, None)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_centre_crop_larger_than_the_image_is_a_window_past_its_ends():
    plan = plan_geometry([v2.Resize(12), v2.CenterCrop(SIZE)], 24, 48, SIZE, 0)
    assert (plan.rows.crop_start, plan.rows.crop_length, plan.rows.resized) == (0, 24, 12)
    assert plan.rows.window_start == -2 and plan.rows.length == SIZE  # two rows of zeros above, as F.center_crop pads
    assert plan.cols.resized == 24 and plan.cols.window_start == 4


def test_a_flip_then_a_crop_cuts_the_mirrored_axis():
    plan = plan_geometry([v2.RandomHorizontalFlip(p=1.0), v2.CenterCrop(SIZE), v2.Resize(SIZE)], 20, 31, SIZE, 0)
    # round(7.5) = 8 columns off the left of the mirrored image are 31 - 8 - 16 = 7 off the left of the image
    assert plan.cols.flip and (plan.cols.crop_start, plan.cols.crop_length, plan.cols.window_start) == (7, SIZE, 0)
    assert not plan.rows.flip and (plan.rows.crop_start, plan.rows.crop_length) == (2, SIZE)


def test_which_chains_are_batched():
    assert {name for name in PRESETS if batchable(preset_ops(name, SIZE))} == {"crop_flip", "square_resize", "none"}
    profile = InputProfile(SIZE, (0.5,) * 3, (0.25,) * 3, "crop_flip")
    for view in parse_views("plain,flip,train,scale:0.8,scale:1.15,fivecrop"):
        assert batchable(tensor_ops(view_transform(view, profile)).transforms), view
    assert not batchable([v2.Resize(20), v2.RandomResizedCrop(SIZE)])  # two resamplings
    assert not batchable([v2.Resize(SIZE, interpolation=v2.InterpolationMode.NEAREST)])


def test_a_five_crop_corner_the_image_cannot_hold_has_no_plan():
    assert plan_geometry([FiveCropCorner(SIZE, 0)], 10, 40, SIZE, 0) is None
    with pytest.raises(ValueError, match="bigger than input size"):
        FiveCropCorner(SIZE, 0)(torch.zeros(3, 10, 40, dtype=torch.uint8))
