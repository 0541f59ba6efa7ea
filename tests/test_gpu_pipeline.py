"""Tests for herbarium/data/gpu.py and device_augment.py (run on a CPU device) and the helpers of bench/throughput.py.

The device path must give the CPU path's batches: the same samples, targets
and augmentation parameters, and pixels within JPEG-decoder tolerance. Here
both decoders are libjpeg-turbo (PIL's and torchvision's CPU build), so the
only differences are the per-image resize kernels; measured on the fixture
images, normalised pixels differ by at most 2 levels of 255 over std and
0.0008 on average. nvJPEG's differences on a GPU are measured by the benchmark.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from fixtures import truncate, write_jpeg
from herbarium.data import augment
from herbarium.data import gpu as gpu_module
from herbarium.data.augment import build_train_transform
from herbarium.data.dataset import ImageDataset, collate
from herbarium.data.device_augment import BatchTransform, Decoded, augment_images, normalize, tensor_ops, train_ops
from herbarium.data.seeding import view_seeds
from herbarium.data.gpu import (
    BytesDataset,
    GpuBatchDecoder,
    GpuLoader,
    GpuViewLoader,
    collate_bytes,
    device_decodable,
    draft_size,
    gpu_moment_batches,
    select_decode,
)
from herbarium.data.images import BadImageError, load_rgb
from herbarium.data.loader import build_loader
from herbarium.data.readers import read_split
from herbarium.data.samplers import EpochSampler, sample_weights
from herbarium.data.transforms import eval_transform, resize_size, to_normalized_tensor
from herbarium.evaluation.tta import InputProfile, MultiViewDataset, collate_views, parse_views, view_transform
from herbarium.stats import ChannelMoments, compute_stats

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates its decoders

RANKS = ("species", "genus", "family")
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.24, 0.26)
SIZE = 16
LEVEL = 1 / 255 / min(STD)  # one grey level, normalised


@pytest.fixture
def train_split(herbarium2020):
    return read_split(herbarium2020["train"].root.parent, "train")


@pytest.fixture
def big_split(herbarium2020):
    """The fixture's train split with 200 x 150 px images: large enough for draft-mode decoding at SIZE 16-32."""
    for seed, path in enumerate(herbarium2020["train"].files.values()):
        write_jpeg(path, 200 + 10 * seed, 150 + 3 * seed, seed=seed)
    return read_split(herbarium2020["train"].root.parent, "train")


def _jpeg_bytes(image: Image.Image, **options) -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, **{"format": "JPEG", "quality": 90, **options})
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _noise(width: int = 50, height: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _cpu_batch(split, transform, decode_min_side, sampler, batch_size=100):
    return next(iter(build_loader(ImageDataset(split, RANKS, transform, decode_min_side=decode_min_side), batch_size, 0, sampler)))


def _gpu_batch(split, sampler, train, decode_min_side, size=SIZE, batch_size=100):
    loader = GpuLoader(BytesDataset(split, RANKS), sampler, batch_size, 0, "cpu", "crop_flip", size, MEAN, STD, train,
                       decode_min_side=decode_min_side)
    return next(iter(loader))


def _sampler(n: int, seed: int = 3, epoch: int = 2) -> EpochSampler:
    sampler = EpochSampler(n, seed=seed)
    sampler.set_epoch(epoch)
    return sampler


# --------------------------------------------------------------- choosing
def test_select_decode_on_a_machine_without_cuda_decoding():
    assert select_decode("cpu", "cpu") == "cpu"
    assert select_decode("auto", "cpu") == "cpu"
    with pytest.raises(ValueError, match="--decode gpu needs a CUDA device"):
        select_decode("gpu", "cpu")
    with pytest.raises(ValueError, match=r"unknown decode 'nvjpeg'; choose one of \['auto', 'cpu', 'gpu'\]"):
        select_decode("nvjpeg", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_select_decode_picks_the_gpu_where_it_decodes(monkeypatch):
    assert select_decode("gpu", "cuda") == "gpu"
    assert select_decode("cpu", "cuda") == "cpu"
    monkeypatch.setattr(gpu_module, "default_workers", lambda: 4)
    assert select_decode("auto", "cuda") == "gpu"  # few cores per GPU


# ------------------------------------------------------------------ bytes
def test_bytes_dataset_returns_the_file_and_the_key_seed(herbarium2020, train_split):
    dataset = BytesDataset(train_split, RANKS)
    item = dataset[(4, 1234)]
    assert item["data"].dtype == torch.uint8
    assert item["data"].numpy().tobytes() == herbarium2020["train"].files[train_split.samples[4].image_id].read_bytes()
    assert item["index"] == 4 and item["seed"] == 1234
    assert torch.equal(item["targets"], ImageDataset(train_split, RANKS, transform=None).targets[4])
    assert dataset[4]["seed"] is None


def test_collate_bytes_keeps_one_buffer_and_the_lengths(train_split):
    dataset = BytesDataset(train_split, RANKS)
    items = [dataset[(i, 10 + i)] for i in (0, 5, 8)]
    batch = collate_bytes([items[0], None, items[1], items[2]])
    assert batch["skipped"] == 1
    assert batch["lengths"].tolist() == [len(item["data"]) for item in items]
    assert [part.numpy().tobytes() for part in batch["data"].split(batch["lengths"].tolist())] == \
        [item["data"].numpy().tobytes() for item in items]
    assert batch["index"].tolist() == [0, 5, 8] and batch["seed"] == [10, 15, 18]
    assert torch.equal(batch["targets"], dataset.targets[[0, 5, 8]])
    assert collate_bytes([None]) == {"skipped": 1}


def test_missing_file_names_file_and_id(herbarium2020, train_split):
    written = herbarium2020["train"]
    image_id = written.image_ids[3]
    written.files[image_id].unlink()
    with pytest.raises(BadImageError, match=rf"image {image_id} at {re.escape(str(written.files[image_id]))}: .*--skip-bad-images"):
        BytesDataset(train_split, RANKS)[3]
    assert BytesDataset(train_split, RANKS, skip_bad_images=True)[3] is None


# --------------------------------------------------------------- decoding
def test_device_decodable_routes_what_nvjpeg_reads_as_pil_does():
    image = _noise()
    assert device_decodable(_jpeg_bytes(image))
    assert device_decodable(_jpeg_bytes(image, progressive=True))
    assert device_decodable(_jpeg_bytes(image.convert("L")))
    assert not device_decodable(_jpeg_bytes(image.convert("CMYK")))
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert not device_decodable(torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8))
    whole = _jpeg_bytes(image)
    assert not device_decodable(whole[: len(whole) // 2])  # truncated: no end-of-image marker
    assert not device_decodable(torch.tensor([0xFF, 0xD8, 0xFF, 0xD9], dtype=torch.uint8))


def test_decoder_matches_pil_and_counts_routes():
    image = _noise()
    png = io.BytesIO()
    image.save(png, format="PNG")
    datas = [_jpeg_bytes(image), _jpeg_bytes(image, progressive=True), _jpeg_bytes(image.convert("CMYK")),
             torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8), _jpeg_bytes(image.convert("L"))]
    decoder = GpuBatchDecoder("cpu")
    decoded = decoder.decode(datas)
    assert decoded.errors == {}
    for data, tensor in zip(datas, decoded.images):
        reference = F.pil_to_tensor(load_rgb(io.BytesIO(data.numpy().tobytes())))
        assert tensor.shape == reference.shape == (3, 40, 50) and tensor.dtype == torch.uint8
        assert (tensor.int() - reference.int()).abs().max() <= 1  # two builds of libjpeg-turbo
    assert decoder.counts == {"device": 3, "pil": 2}


def test_a_stream_failing_the_batched_call_is_found_and_the_others_kept():
    good = _jpeg_bytes(_noise())
    data = good.numpy().tobytes()
    header_only = data[: data.index(b"\xff\xda")] + b"\xff\xd9"  # passes the marker check, has no scan
    broken = torch.frombuffer(bytearray(header_only), dtype=torch.uint8)
    assert device_decodable(broken)
    decoder = GpuBatchDecoder("cpu")
    decoded = decoder.decode([good, broken, good])
    assert decoded.images[0] is not None and decoded.images[2] is not None and decoded.images[1] is None
    assert list(decoded.errors) == [1]
    assert decoder.counts == {"device": 2, "failed": 1}


@pytest.fixture(scope="module")
def sheets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sheets")
    return {(w, h): write_jpeg(folder / f"{w}x{h}.jpg", w, h, seed=1) for w, h in [(1000, 661), (661, 1000), (203, 150)]}


@pytest.mark.parametrize("min_side", [None, 64, 112, 224, 300, 400])
def test_draft_size_is_the_size_load_rgb_decodes_at(sheets, min_side):
    for (width, height), path in sheets.items():
        assert draft_size(width, height, min_side) == load_rgb(path, min_side).size


def test_decoder_reproduces_draft_mode(tmp_path):
    ys, xs = np.mgrid[0:661, 0:1000]
    smooth = np.stack([xs * 255 / 999, ys * 255 / 660, 128 + 100 * np.sin(xs / 40) * np.cos(ys / 30)], -1).astype(np.uint8)
    path = tmp_path / "sheet.jpg"
    Image.fromarray(smooth).save(path, quality=90)
    data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    (image,) = GpuBatchDecoder("cpu", decode_min_side=resize_size(224)).decode([data]).images
    reference = F.pil_to_tensor(load_rgb(path, resize_size(224))).float()
    assert image.shape == reference.shape == (3, 331, 500)
    assert (image.float() - reference).abs().mean() < 1  # grey levels; measured 0.41 (libjpeg's scaled DCT vs an area average)


# ---------------------------------------------------------- augmentation
def test_tensor_ops_are_the_cpu_transforms_without_conversion():
    ops = tensor_ops(build_train_transform("crop_flip", SIZE, MEAN, STD))
    assert [type(op) for op in ops.transforms] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    profile = InputProfile(SIZE, MEAN, STD, "crop_flip")
    flip = tensor_ops(view_transform("flip", profile))
    assert [type(op) for op in flip.transforms] == [v2.RandomHorizontalFlip, v2.Resize, v2.CenterCrop]


def test_train_ops_prefer_the_shared_preset_ops(monkeypatch):
    assert [type(op) for op in train_ops("crop_flip", SIZE).transforms] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    with pytest.raises(ValueError, match="unknown augmentation preset 'nope'"):
        train_ops("nope", SIZE)
    monkeypatch.setattr(augment, "preset_ops", lambda preset, size: [v2.CenterCrop(size - 1)], raising=False)
    (op,) = train_ops("crop_flip", SIZE).transforms
    assert isinstance(op, v2.CenterCrop) and op.size == (SIZE - 1, SIZE - 1)


def test_normalize_is_the_cpu_conversion_in_channels_last():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 5, 7), dtype=np.uint8))
    result = normalize(images, torch.tensor(MEAN), torch.tensor(STD))
    expected = torch.stack([to_normalized_tensor(MEAN, STD)(image) for image in images])
    assert result.dtype == torch.float32 and result.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(result, expected)


def test_seeded_augmentation_leaves_the_global_rng_alone():
    images = [F.pil_to_tensor(_noise(seed=s)) for s in range(3)]
    ops = train_ops("crop_flip", SIZE)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = augment_images(images, [7, 8, 9], ops, SIZE)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(augment_images(images, [7, 8, 9], ops, SIZE), first)
    assert not torch.equal(augment_images(images, [1, 2, 3], ops, SIZE), first)
    augment_images(images, [None, None, None], ops, SIZE)  # unseeded: drawn from the global generator
    assert not torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------ the CPU path, reproduced
@pytest.mark.parametrize("train", [True, False])
def test_batches_match_the_cpu_path(train_split, train):
    transform = build_train_transform("crop_flip", SIZE, MEAN, STD) if train else eval_transform(SIZE, MEAN, STD)
    decode_min_side = 2 * SIZE if train else resize_size(SIZE)
    cpu = _cpu_batch(train_split, transform, decode_min_side, _sampler(len(train_split)))
    gpu = _gpu_batch(train_split, _sampler(len(train_split)), train, decode_min_side)
    assert torch.equal(gpu["index"], cpu["index"]) and torch.equal(gpu["targets"], cpu["targets"])
    assert gpu["skipped"] == cpu["skipped"] == 0
    assert gpu["image"].shape == cpu["image"].shape == (len(train_split), 3, SIZE, SIZE)
    assert gpu["image"].dtype == torch.float32 and gpu["image"].is_contiguous(memory_format=torch.channels_last)
    difference = (gpu["image"] - cpu["image"]).abs()
    assert difference.max() <= 2 * LEVEL + 1e-6
    assert difference.mean() < 0.002


def test_herbarium_sheet_at_224_matches_the_cpu_path(tmp_path, train_split):
    """The training default on a 1000 x 661 sheet: full-size decode, random crop from the same seed."""
    shutil.copy(write_jpeg(tmp_path / "sheet.jpg", 1000, 661, seed=0), train_split.image_root / "sheet.jpg")
    split = dataclasses.replace(train_split, samples=[dataclasses.replace(train_split.samples[0], file_name="sheet.jpg")] * 4)
    cpu_set = ImageDataset(split, RANKS, build_train_transform("crop_flip", 224, MEAN, STD), decode_min_side=448)
    cpu = collate([cpu_set[(0, seed)] for seed in (11, 12, 13, 14)])
    loader = GpuLoader(BytesDataset(split, RANKS), [(0, seed) for seed in (11, 12, 13, 14)], 4, 0, "cpu", "crop_flip",
                       224, MEAN, STD, True, decode_min_side=448)
    (gpu,) = list(loader)
    difference = (gpu["image"] - cpu["image"]).abs()
    assert difference.max() <= 2 * LEVEL + 1e-6
    assert difference.mean() < 0.001


def test_draft_mode_is_reproduced_so_random_crops_match(big_split):
    """At SIZE 32 the CPU path decodes these images at half size; crops depend on the image size."""
    size = 32
    cpu = _cpu_batch(big_split, build_train_transform("crop_flip", size, MEAN, STD), 2 * size, _sampler(len(big_split)))
    gpu = _gpu_batch(big_split, _sampler(len(big_split)), True, 2 * size, size=size)
    full_size = _gpu_batch(big_split, _sampler(len(big_split)), True, None, size=size)
    assert (gpu["image"] - cpu["image"]).abs().mean() < 0.05  # measured 0.016: decoder tolerance only
    assert (full_size["image"] - cpu["image"]).abs().mean() > 0.1  # measured 0.22: other crops


def test_loader_follows_a_weighted_sampler_with_workers_over_two_epochs(train_split):
    dataset = ImageDataset(train_split, RANKS, build_train_transform("crop_flip", SIZE, MEAN, STD), decode_min_side=2 * SIZE)
    weights = sample_weights(dataset.targets[:, 0], "balanced")
    cpu_sampler, gpu_sampler = EpochSampler(len(dataset), weights, seed=1), EpochSampler(len(dataset), weights, seed=1)
    cpu_loader = build_loader(dataset, 4, 0, cpu_sampler, drop_last=True)
    gpu_loader = GpuLoader(BytesDataset(train_split, RANKS), gpu_sampler, 4, 2, "cpu", "crop_flip", SIZE, MEAN, STD, True,
                           drop_last=True, generator=torch.Generator().manual_seed(0), decode_min_side=2 * SIZE)
    assert len(gpu_loader) == len(cpu_loader) == 2
    for epoch in (0, 1):
        cpu_sampler.set_epoch(epoch, start=4 * epoch)
        gpu_sampler.set_epoch(epoch, start=4 * epoch)
        cpu_batches, gpu_batches = list(cpu_loader), list(gpu_loader)
        assert len(gpu_batches) == len(cpu_batches) == 2 - epoch
        for cpu, gpu in zip(cpu_batches, gpu_batches):
            assert torch.equal(gpu["index"], cpu["index"]) and torch.equal(gpu["targets"], cpu["targets"])
            assert (gpu["image"] - cpu["image"]).abs().max() <= 2 * LEVEL + 1e-6


def test_views_match_the_multiview_dataset(train_split):
    profiles = [InputProfile(SIZE, MEAN, STD, "crop_flip"), InputProfile(12, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2), "crop_flip")]
    views = ("train", "train", "flip", "plain")
    decode_min_side = max(resize_size(p.size) for p in profiles)
    images = ImageDataset(train_split, RANKS, transform=lambda image: image, decode_min_side=decode_min_side)
    cpu = collate_views([MultiViewDataset(images, views, profiles, seed=5)[i] for i in range(len(images))])
    loader = GpuViewLoader(BytesDataset(train_split, RANKS), 100, 0, "cpu", [[view_transform(v, p) for v in views] for p in profiles],
                           [p.size for p in profiles], [p.mean for p in profiles], [p.std for p in profiles], seed=5,
                           decode_min_side=decode_min_side)
    (gpu,) = list(loader)
    assert torch.equal(gpu["index"], cpu["index"]) and torch.equal(gpu["targets"], cpu["targets"])
    for profile, cpu_views, gpu_views in zip(profiles, cpu["views"], gpu["views"]):
        assert gpu_views.shape == cpu_views.shape == (len(images), len(views), 3, profile.size, profile.size)
        difference = (gpu_views - cpu_views).abs()
        assert difference.max() <= 2 / 255 / min(profile.std) + 1e-6
        assert difference.mean() < 0.002


def test_moments_match_collect_stats(train_split):
    size = 20  # no fixture image is 40 px on its shorter side: no draft-mode decoding
    expected = compute_stats(train_split, size, workers=0, batch_size=4, progress=False)
    moments = ChannelMoments()
    for batch, skipped in gpu_moment_batches(train_split, size, 0, 4, "cpu"):
        assert skipped == 0
        for count, mean, m2 in batch.numpy():
            moments.merge(count[0], mean, m2)
    assert moments.count == expected["num_images"] * size * size
    np.testing.assert_allclose(moments.mean, expected["mean"], atol=2e-4)
    np.testing.assert_allclose(moments.std, expected["std"], atol=2e-4)


# ------------------------------------------------------ batched on the device
def _decoded(count: int, min_side: int | None = None) -> Decoded:
    """``count`` decoded sheets of varied sizes, full size, with the draft size the CPU path would decode them at."""
    images, sizes = [], []
    for seed in range(count):
        data = _jpeg_bytes(_smooth(120 + 9 * (seed % 5), 90 + 13 * (seed % 3), seed))
        decoded = GpuBatchDecoder("cpu", decode_min_side=min_side).decode([data], draft=False)
        images.append(decoded.images[0])
        sizes.append(decoded.sizes[0])
    return Decoded(images, sizes)


def _smooth(width: int, height: int, seed: int) -> Image.Image:
    coarse = torch.rand(1, 3, height // 6 + 1, width // 6 + 1, generator=torch.Generator().manual_seed(seed)) * 255
    pixels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 255).round()
    return Image.fromarray(pixels[0].permute(1, 2, 0).to(torch.uint8).numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16 (CUDA's)"])
@pytest.mark.parametrize("min_side", [None, 40])
def test_batched_and_per_image_augmentation_give_the_same_pixels(min_side, dtype):
    """The default preset and the evaluation views, with and without draft-mode reduction (40: half size)."""
    decoded = dataclasses.replace(_decoded(8, min_side), dtype=dtype)
    assert (min_side is None) == all(tuple(image.shape[-2:]) == size for image, size in zip(decoded.images, decoded.sizes))
    profile = InputProfile(SIZE, MEAN, STD, "crop_flip")
    for ops in ([train_ops("crop_flip", SIZE)], [tensor_ops(view_transform(v, profile)) for v in ("train", "plain", "flip", "scale:0.8")]):
        transform = BatchTransform(ops, SIZE)
        seeds = view_seeds(range(8), len(ops), seed=5)
        plans = transform.plan(decoded.sizes, seeds)
        assert plans is not None
        batched, one_by_one = transform.run(decoded, plans, seeds).float(), transform.run(decoded, None, seeds)
        assert batched.shape == one_by_one.shape == (8, len(ops), 3, SIZE, SIZE)
        difference = (batched - one_by_one).abs()
        assert difference.max() <= 2, difference.max()  # grey levels
        assert difference.mean() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_batches_match_the_cpu_path_and_kernels_do_not_grow_with_the_batch(big_split):
    size = 32
    cpu = _cpu_batch(big_split, build_train_transform("crop_flip", size, MEAN, STD), 2 * size, _sampler(len(big_split)))
    loader = GpuLoader(BytesDataset(big_split, RANKS), _sampler(len(big_split)), 100, 0, "cuda", "crop_flip", size, MEAN, STD,
                       True, decode_min_side=2 * size)
    (device,) = list(loader)
    assert device["image"].is_cuda and device["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(device["index"], cpu["index"]) and loader.decoder.counts == {"device": len(big_split)}
    assert (device["image"].cpu() - cpu["image"]).abs().mean() < 0.05  # nvJPEG's IDCT and upsampling differ from libjpeg's
    kernels = {}
    for batch in (4, 64):
        decoded = _decoded(batch, min_side=40)
        decoded = Decoded([image.cuda() for image in decoded.images], decoded.sizes)
        seeds = list(range(batch))
        plans = loader.plan(decoded.sizes, seeds, seeds)
        loader.make(decoded, plans, seeds, seeds)  # warm-up: cuBLAS picks its kernels
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            loader.make(Decoded(decoded.images, decoded.sizes), plans, seeds, seeds)
            torch.cuda.synchronize()
        kernels[batch] = sum(event.count for event in profile.key_averages() if event.device_type == torch.autograd.DeviceType.CUDA)
    assert kernels[64] <= kernels[4] + 8, kernels  # cuBLAS may split a larger product in two


class _CountOps(TorchDispatchMode):
    """Counts the tensor operations dispatched inside it (each is at least one kernel on a device)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train", [True, False])
def test_device_operations_per_batch_do_not_grow_with_the_batch(train_split, train):
    """What the device runs after decoding, for a batch of 4 and of 64: the same operations, as many."""
    loader = GpuLoader(BytesDataset(train_split, RANKS), None, 4, 0, "cpu", "crop_flip", SIZE, MEAN, STD, train)
    counts = {}
    for batch in (4, 64):
        decoded = _decoded(batch, min_side=40)
        seeds, indices = list(range(batch)), list(range(batch))
        plans = loader.plan(decoded.sizes, seeds, indices)  # CPU: the random parameters, per sample
        with _CountOps() as counter:
            images = loader.make(decoded, plans, seeds, indices)["image"]
        assert images.shape == (batch, 3, SIZE, SIZE)
        counts[batch] = counter.ops
    assert counts[4] == counts[64]  # about 240 operations (a third of them views, which launch nothing), whatever the batch


def test_views_of_every_kind_are_batched_and_other_presets_run_image_by_image(train_split):
    profile = InputProfile(SIZE, MEAN, STD, "crop_flip")
    views = parse_views("train,plain,flip,scale:1.15,fivecrop")
    loader = GpuViewLoader(BytesDataset(train_split, RANKS), 4, 0, "cpu", [[view_transform(v, profile) for v in views]],
                           [SIZE], [MEAN], [STD])
    assert loader.background
    loader = GpuLoader(BytesDataset(train_split, RANKS), _sampler(len(train_split)), 100, 0, "cpu", "shift_scale_rotate_cutout",
                       SIZE, MEAN, STD, True, decode_min_side=2 * SIZE)
    assert not loader.background  # its ops draw from the global generator, shared with the caller
    (batch,) = list(loader)
    cpu = _cpu_batch(train_split, build_train_transform("shift_scale_rotate_cutout", SIZE, MEAN, STD), 2 * SIZE,
                     _sampler(len(train_split)))
    assert batch["image"].shape == cpu["image"].shape and torch.equal(batch["index"], cpu["index"])


# ------------------------------------------------------------ bad images
def test_bad_images_are_skipped_and_counted(herbarium2020, train_split):
    written = herbarium2020["train"]
    written.files[written.image_ids[1]].unlink()
    truncate(written.files[written.image_ids[2]])
    loader = GpuLoader(BytesDataset(train_split, RANKS, skip_bad_images=True), None, 5, 0, "cpu", "crop_flip", SIZE, MEAN, STD,
                       False)
    first, second = list(loader)
    assert first["skipped"] == 2 and first["index"].tolist() == [0, 3, 4]
    assert first["image"].shape == (3, 3, SIZE, SIZE)
    assert second["skipped"] == 0 and second["index"].tolist() == [5, 6, 7, 8]
    assert loader.decoder.counts["failed"] == 1


def test_undecodable_bytes_raise_naming_the_file(herbarium2020, train_split):
    written = herbarium2020["train"]
    image_id = written.image_ids[2]
    truncate(written.files[image_id])
    loader = GpuLoader(BytesDataset(train_split, RANKS), None, 5, 0, "cpu", "crop_flip", SIZE, MEAN, STD, False)
    with pytest.raises(BadImageError, match=rf"(?i)image {image_id} at {re.escape(str(written.files[image_id]))}: .*truncated"):
        list(loader)


def test_a_batch_of_only_bad_images_is_only_counted(herbarium2020, train_split):
    for image_id in herbarium2020["train"].image_ids[:2]:
        truncate(herbarium2020["train"].files[image_id])
    loader = GpuLoader(BytesDataset(train_split, RANKS, skip_bad_images=True), None, 2, 0, "cpu", "crop_flip", SIZE, MEAN, STD,
                       True)
    assert next(iter(loader)) == {"skipped": 2}


# ----------------------------------------------------- benchmark helpers
@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("bench_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_bench_sheets_are_herbarium_sized(bench):
    data = bench.herbarium_sheet(seed=0)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (1000, 661) and image.format == "JPEG"
    assert 150_000 <= len(data) <= 200_000
    assert bench.herbarium_sheet(seed=1) != data


def test_bench_median_of_windows(bench):
    windows = [bench.Window(100, 1.0), bench.Window(300, 1.0), bench.Window(200, 2.0)]
    assert bench.median_rate(windows) == 100.0
    with pytest.raises(ValueError):
        bench.median_rate([])
    calls = {"step": 0, "sync": 0}

    def step():
        calls["step"] += 1
        return 8

    timed = bench.time_windows(step, warmup=2, windows=3, steps=4, synchronize=lambda: calls.__setitem__("sync", calls["sync"] + 1))
    assert calls == {"step": 2 + 3 * 4, "sync": 1 + 3}
    assert [window.images for window in timed] == [32, 32, 32]


def test_bench_cycles_samples_for_long_epochs(bench, train_split):
    long = bench.cycled(train_split, 20)
    assert len(long) == 20 and long.samples[9] == train_split.samples[0] and len(train_split) == 9
