"""Tests for herbarium/data/dataset.py, images.py, transforms.py and augment.py."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch
from PIL import Image

from fixtures import truncate, write_jpeg
from herbarium.data.augment import build_train_transform
from herbarium.data.dataset import UNLABELLED, ImageDataset, collate
from herbarium.data.images import BadImageError, load_rgb
from herbarium.data.loader import build_loader
from herbarium.data.readers import read_split
from herbarium.data.samplers import EpochSampler
from herbarium.data.transforms import eval_transform, resize_size

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 16


@pytest.fixture
def train_split(herbarium2020):
    return read_split(herbarium2020["train"].root.parent, "train")


def _dataset(split, ranks=("family", "genus", "species"), transform=None, **kwargs) -> ImageDataset:
    return ImageDataset(split, ranks, transform or eval_transform(SIZE, MEAN, STD), **kwargs)


# --------------------------------------------------------------- targets
def test_targets_follow_the_requested_rank_order(train_split):
    ranks = ("species", "family")
    dataset = _dataset(train_split, ranks)
    taxonomy = train_split.taxonomy
    expected = [[taxonomy.targets(s.category_id)[rank] for rank in ranks] for s in train_split.samples]
    assert dataset.targets.tolist() == expected
    item = dataset[4]
    assert item["index"] == 4
    assert item["targets"].tolist() == expected[4]
    assert item["image"].shape == (3, SIZE, SIZE)
    assert item["image"].dtype == torch.float32


def test_unlabelled_images_have_minus_one(herbarium2020):
    test = read_split(herbarium2020["test"].root.parent, "test")
    dataset = _dataset(test, ("genus", "species"))
    assert UNLABELLED == -1
    assert dataset.targets.tolist() == [[-1, -1]] * 3
    assert dataset[0]["targets"].tolist() == [-1, -1]


def test_unknown_rank_is_refused(train_split):
    with pytest.raises(ValueError, match="'kingdom'"):
        _dataset(train_split, ("kingdom",))


def test_collate_stacks(train_split):
    dataset = _dataset(train_split)
    batch = collate([dataset[i] for i in (0, 5, 8)])
    assert batch["skipped"] == 0
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    assert torch.equal(batch["targets"], dataset.targets[[0, 5, 8]])
    assert batch["index"].tolist() == [0, 5, 8]


# ------------------------------------------------------------ bad images
def test_missing_file_names_file_and_id(herbarium2020, train_split):
    written = herbarium2020["train"]
    image_id = written.image_ids[3]
    written.files[image_id].unlink()
    with pytest.raises(BadImageError) as error:
        _dataset(train_split)[3]
    message = str(error.value)
    assert f"image {image_id!r}" in message and str(written.files[image_id]) in message
    assert "--skip-bad-images" in message


def test_truncated_jpeg_names_file_and_id(herbarium2020, train_split):
    written = herbarium2020["train"]
    image_id = written.image_ids[6]
    truncate(written.files[image_id])
    with pytest.raises(BadImageError, match=rf"image {image_id} at {re.escape(str(written.files[image_id]))}: .*truncated"):
        _dataset(train_split)[6]


def test_skip_bad_images_drops_and_counts_them(herbarium2020, train_split):
    written = herbarium2020["train"]
    written.files[written.image_ids[1]].unlink()
    truncate(written.files[written.image_ids[2]])
    dataset = _dataset(train_split, skip_bad_images=True)
    items = [dataset[i] for i in range(5)]
    assert items[1] is None and items[2] is None
    batch = collate(items)
    assert batch["skipped"] == 2
    assert batch["index"].tolist() == [0, 3, 4]
    assert batch["image"].shape[0] == 3
    assert torch.equal(batch["targets"], dataset.targets[[0, 3, 4]])
    assert collate([None, None]) == {"skipped": 2}


def test_loader_with_sampler_counts_skipped_and_replays_an_epoch(herbarium2020, train_split):
    written = herbarium2020["train"]
    truncate(written.files[written.image_ids[4]])
    dataset = _dataset(train_split, transform=build_train_transform("crop_flip", SIZE, MEAN, STD), skip_bad_images=True)
    sampler = EpochSampler(len(dataset), seed=0)

    def one_epoch():
        sampler.set_epoch(1)
        batches = list(build_loader(dataset, batch_size=4, workers=0, sampler=sampler))
        return (torch.cat([b["index"] for b in batches]), torch.cat([b["image"] for b in batches]),
                sum(b["skipped"] for b in batches))

    indices, images, skipped = one_epoch()
    assert skipped == 1
    assert sorted(indices.tolist()) == [i for i in range(9) if i != 4]
    torch.manual_seed(77)  # the global RNG plays no part
    again = one_epoch()
    assert torch.equal(again[0], indices) and torch.equal(again[1], images)


# ---------------------------------------------------------- augmentation
def test_augmentation_is_a_function_of_the_key_only(train_split):
    dataset = _dataset(train_split, transform=build_train_transform("crop_flip", SIZE, MEAN, STD))
    torch.manual_seed(1)
    first = dataset[(2, 1234)]["image"]
    torch.manual_seed(2)
    before = torch.get_rng_state()
    again = dataset[(2, 1234)]["image"]
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    others = [dataset[(2, seed)]["image"] for seed in range(1, 6)]
    assert any(not torch.equal(first, other) for other in others)


def test_unkeyed_access_uses_the_global_rng(train_split):
    dataset = _dataset(train_split, transform=build_train_transform("crop_flip", SIZE, MEAN, STD))
    torch.manual_seed(3)
    first = dataset[2]["image"]
    torch.manual_seed(3)
    assert torch.equal(dataset[2]["image"], first)


def test_unknown_augmentation_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown augmentation preset 'nope'; choose one of \[.*'crop_flip'"):
        build_train_transform("nope", SIZE, MEAN, STD)


def test_eval_transform_normalises(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (40, 30), (128, 64, 255)).save(path)
    tensor = eval_transform(SIZE, MEAN, STD)(load_rgb(path))
    assert resize_size(224) == 256
    assert tensor.shape == (3, SIZE, SIZE)
    expected = torch.tensor([(128 / 255 - 0.5) / 0.25, (64 / 255 - 0.5) / 0.25, (255 / 255 - 0.5) / 0.25])
    assert torch.allclose(tensor.mean(dim=(1, 2)), expected, atol=1e-5)


# ------------------------------------------------------------ draft mode
@pytest.fixture(scope="module")
def sheet(tmp_path_factory):
    """A herbarium-sheet-shaped JPEG, 1000 x 661."""
    return write_jpeg(tmp_path_factory.mktemp("sheet") / "sheet.jpg", 1000, 661, seed=0)


def test_draft_decodes_smaller_but_never_below_min_side(sheet):
    image = load_rgb(sheet, min_side=224)
    assert image.mode == "RGB"
    assert 224 <= min(image.size) < 661
    assert image.size[0] > image.size[1]  # aspect kept


def test_full_size_without_min_side(sheet):
    assert load_rgb(sheet).size == (1000, 661)
    assert load_rgb(sheet, min_side=400).size == (1000, 661)  # 1/2 scale would fall below 400


def test_non_jpeg_and_grey_images_decode_as_rgb(tmp_path):
    Image.new("L", (50, 30), 77).save(tmp_path / "grey.png")
    image = load_rgb(tmp_path / "grey.png", min_side=8)
    assert image.mode == "RGB" and image.size == (50, 30)
    assert image.getpixel((3, 3)) == (77, 77, 77)


def test_dataset_passes_its_decode_size(sheet, train_split):
    shutil.copy(sheet, train_split.image_root / "sheet.jpg")
    train_split.samples[0] = dataclasses.replace(train_split.samples[0], file_name="sheet.jpg")
    sizes = lambda image: torch.tensor(image.size)  # noqa: E731
    assert 224 <= _dataset(train_split, transform=sizes, decode_min_side=224)[0]["image"].min() < 661
    assert _dataset(train_split, transform=sizes)[0]["image"].tolist() == [1000, 661]
