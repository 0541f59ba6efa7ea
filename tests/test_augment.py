"""Tests for herbarium/data/augment.py: the presets on PIL images and on tensors, and end to end in the loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from herbarium import build
from herbarium.data import splits
from herbarium import engine
from herbarium.config import DataConfig, TrainConfig
from herbarium.data.augment import PRESETS, build_train_transform, describe_presets, preset_ops
from herbarium.data.transforms import eval_transform
from herbarium.demo import make_demo_data
from herbarium.distributed import DistributedContext
from herbarium.evaluation.tta import InputProfile, view_transform

SIZE = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
AFTER_TO_IMAGE = (v2.RandomErasing,)  # pixel ops of the final frame, on tensors (see augment.py)
# torchvision.io decodes JPEGs as the GPU input path does; its deprecation notice is not under test.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _pixels(width: int = 72, height: int = 54, seed: int = 0) -> np.ndarray:
    """A non-square RGB image with no black pixel: gradients plus noise, different left/right and top/bottom."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([40 + xs * 200 / width, 40 + ys * 200 / height, 40 + 100 * ((xs // 6 + ys // 6) % 2)], -1)
    return np.clip(base + rng.normal(0, 8, base.shape), 30, 255).astype(np.uint8)


@pytest.fixture
def jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "sheet.jpg"
    Image.fromarray(_pixels()).save(path, format="JPEG", quality=92)
    return path


def _seeded(transform, image, seed: int):
    torch.manual_seed(seed)
    return transform(image)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_gives_normalised_tensors_of_the_size_deterministic_per_seed(name, jpeg):
    image = Image.open(jpeg).convert("RGB")
    transform = build_train_transform(name, SIZE, MEAN, STD)
    outputs = [_seeded(transform, image, seed) for seed in range(6)]
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for tensor in outputs:
        assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
        assert (tensor >= low[:, None, None] - 1e-5).all() and (tensor <= high[:, None, None] + 1e-5).all()
        assert tensor.std() > 0.1  # an image, not a constant
    assert torch.equal(_seeded(transform, image, 3), outputs[3])
    if name != "none":
        assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_every_preset_is_described():
    for name, preset in PRESETS.items():
        assert len(preset.description.split()) >= 15, name
        assert f"{name}: {preset.description}" in describe_presets()
    assert "Herbarium 2020" in PRESETS["crop_flip"].description
    assert "Shopee" in PRESETS["shift_scale_rotate_cutout"].description
    assert "AliProducts" in PRESETS["perspective_erasing"].description
    assert "Herbarium 2022" in PRESETS["square_resize"].description


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_ops_keep_the_dtype_of_tensors(name, jpeg):
    uint8 = decode_jpeg(read_file(str(jpeg)))
    ops = v2.Compose(preset_ops(name, SIZE))
    out = _seeded(ops, uint8, 0)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.uint8
    floats = _seeded(ops, uint8.float() / 255, 0)
    assert floats.dtype == torch.float32 and 0 <= floats.min() and floats.max() <= 1
    assert (floats - out.float() / 255).abs().mean() < 0.01


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_erasing_comes_last_after_to_image(name):
    ops = preset_ops(name, SIZE)
    for position, op in enumerate(ops):
        if isinstance(op, AFTER_TO_IMAGE):
            assert any(isinstance(earlier, v2.ToImage) for earlier in ops[:position]), (name, op)
            assert all(isinstance(later, AFTER_TO_IMAGE) for later in ops[position:]), (name, op)


def _area_disagreement(pil_out: torch.Tensor, tensor_out: torch.Tensor) -> torch.Tensor:
    """Pixels differing by more than 0.1 whose whole 3x3 neighbourhood differs too.

    Resampling PIL and tensors differently only moves the edge of a rotated or
    warped image by a pixel (thin lines); different parameters or a skipped
    op (an erased rectangle, a flip) differ over whole areas.
    """
    differs = ((pil_out.float() - tensor_out.float()).abs().amax(0) / 255 > 0.1).float()
    return -torch.nn.functional.max_pool2d(-differs[None, None], 3, stride=1, padding=1)[0, 0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_pil_and_tensor_paths_agree_for_the_same_seed(name, jpeg):
    """The CPU path (PIL decode) and the GPU path's ops (tensor decode) give the same image for a seed."""
    ops = v2.Compose(preset_ops(name, 48))
    pil_image = Image.open(jpeg).convert("RGB")
    tensor_image = decode_jpeg(read_file(str(jpeg)))
    for seed in range(8):
        pil_out = v2.ToImage()(_seeded(ops, pil_image, seed))
        tensor_out = _seeded(ops, tensor_image, seed)
        assert pil_out.shape == tensor_out.shape == (3, 48, 48)
        assert (pil_out.float() - tensor_out.float()).abs().mean() / 255 < 0.01, (name, seed)
        assert _area_disagreement(pil_out, tensor_out).sum() == 0, (name, seed)


def test_erasing_presets_erase_on_the_pil_path(jpeg):
    image = Image.open(jpeg).convert("RGB")
    for name in ("shift_scale_rotate_cutout", "perspective_erasing"):
        without = v2.Compose([op for op in preset_ops(name, 48) if not isinstance(op, v2.RandomErasing)])
        ops = v2.Compose(preset_ops(name, 48))
        erased = 0
        for seed in range(8):
            full, geometric = _seeded(ops, image, seed), v2.ToImage()(_seeded(without, image, seed))
            # RandomErasing draws after the geometric ops, so both share their parameters.
            erased += int(not torch.equal(full, geometric))
            assert ((full == geometric) | (full == 0)).all()  # only blacked-out pixels change
        assert erased >= 2, name


def test_none_is_the_eval_transform(jpeg):
    image = Image.open(jpeg).convert("RGB")
    assert torch.equal(build_train_transform("none", SIZE, MEAN, STD)(image), eval_transform(SIZE, MEAN, STD)(image))


def test_square_resize_keeps_the_whole_image(jpeg):
    image = Image.open(jpeg).convert("RGB")
    whole = F.pil_to_tensor(F.resize(image, [SIZE, SIZE], antialias=True))
    for seed in range(4):
        out = F.pil_to_tensor(_seeded(v2.Compose(preset_ops("square_resize", SIZE)), image, seed))
        assert torch.equal(out, whole) or torch.equal(out, F.horizontal_flip(whole))


def test_crop_flip_crops_and_flips(jpeg):
    image = Image.open(jpeg).convert("RGB")
    ops = v2.Compose(preset_ops("crop_flip", SIZE))
    outs = [F.pil_to_tensor(_seeded(ops, image, seed)) for seed in range(12)]
    # The image is darker on the left (red channel grows with x): a flip puts the bright side first.
    flipped = [bool(out[0, :, : SIZE // 2].float().mean() > out[0, :, SIZE // 2 :].float().mean()) for out in outs]
    assert any(flipped) and not all(flipped)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'nope'.*'crop_flip'.*'none'.*'perspective_erasing'.*'shift_scale_rotate_cutout'.*'square_resize'"):
        build_train_transform("nope", SIZE, MEAN, STD)
    with pytest.raises(ValueError, match="at least 1 pixel"):
        preset_ops("crop_flip", 0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("augment") / "demo"
    make_demo_data(out, image_size=SIZE, max_per_class=3, min_per_class=2, test_per_class=1)
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_works_in_the_training_loader_and_as_a_tta_view(name, demo):
    cfg = TrainConfig(data=DataConfig(data=str(demo), val_split="test", size=SIZE, batch_size=4, workers=0, augment=name))
    train, val = splits.read_train_val(cfg)
    loaders = build.build_loaders(cfg, train, val, build.resolve_normalization(cfg), DistributedContext(), torch.device("cpu"))
    batch = next(iter(loaders.train))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    view = view_transform("train", InputProfile(SIZE, MEAN, STD, name))
    assert view(Image.open(next((demo / "test").rglob("*.jpg"))).convert("RGB")).shape == (3, SIZE, SIZE)


def test_train_cli_config_carries_the_preset(demo):
    from herbarium.train_cli import build_parser, config_from_args

    for name in PRESETS:
        cfg = config_from_args(build_parser().parse_args([str(demo), "--augment", name]))
        assert cfg.data.augment == name
        assert TrainConfig.from_dict(cfg.to_dict()).data.augment == name
