"""The GPU input path: CPU workers read JPEG bytes, the device decodes and augments them.

A PIL DataLoader decodes about 180 Herbarium-sized JPEGs per second per
core, so a machine with few cores per GPU cannot feed it. Here the workers
only read file bytes; a background thread decodes each batch with one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA),
then crops, resizes and flips the whole batch at once: every sample's
random parameters are drawn on the CPU from its per-sample seed, exactly as
the CPU path draws them (:mod:`herbarium.data.geometry`), and applied to
all images in a few batched device calls (:mod:`herbarium.data.resample`),
followed by one conversion and normalisation to channels_last. The thread
works up to :data:`PREFETCH_BATCHES` batches ahead of the training step.

Pieces, each usable alone:

* :class:`BytesDataset` and :func:`collate_bytes`: file bytes per sample,
  with the targets and bad-file policy of :class:`ImageDataset`.
* :class:`GpuBatchDecoder`: a list of byte tensors to uint8 [3, H, W]
  images on the device. Streams nvJPEG cannot take (not a JPEG, CMYK,
  lossless or 12-bit, no end marker) and streams a batched call fails on go
  to PIL, as on the CPU path; every route is counted.
* :mod:`herbarium.data.device_augment`: the views of a batch, batched
  where the ops are crops, resizes and flips, image by image otherwise.
* :class:`GpuLoader` (training / validation batches), :class:`GpuViewLoader`
  (TTA views, as :class:`~herbarium.evaluation.tta.MultiViewDataset`) and
  :func:`gpu_moment_batches` (collect-stats moments).

Which path ``--decode auto`` takes is :func:`select_decode`'s rule.
Everything runs on a CPU device too (``decode_jpeg(..., device="cpu")``),
which is how the tests check it against the CPU path.
"""

from __future__ import annotations

import functools
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from herbarium.data.dataset import ImageDataset
from herbarium.data.device_augment import (
    BatchTransform, Decoded, draft_image, eval_ops, image_moments, normalize, tensor_ops, train_ops,
)
from herbarium.data.geometry import Plan
from herbarium.data.images import IMAGE_ERRORS, BadImageError, load_rgb
from herbarium.data.loader import prefetch_factor
from herbarium.data.prefetch import prefetched
from herbarium.data.readers import DatasetSplit
from herbarium.data.seeding import view_seeds
from herbarium.data.transforms import stats_transform
from herbarium.runtime import default_workers, local_processes

DECODES = ("auto", "cpu", "gpu")
BYTE_WORKERS = 4  # workers that only read files keep up with nvJPEG; more would only hold memory
PREFETCH_BATCHES = 2  # device batches made ahead of the one in use
# `--decode auto` takes the device path only below this many cores per GPU. Measured on one H200 with 16
# cores (SE-ResNeXt50 at 224 px, bf16, compiled, batch 256): the CPU path trained at 0.756 of the
# model-only speed (2,880 images/s, PIL at ~180 images/s per core), the device path of the time (one image
# at a time on the device) at 0.350 (1,334 images/s). At ~180 images/s per core the CPU path falls below
# that from 7 cores down. bench/throughput.py measures both paths; see the README for what would change this.
AUTO_DEVICE_BELOW_CORES = 8


def loader_workers(requested: int | None, decode: str) -> int:
    """DataLoader workers per process for an input path: ``requested``, else this process's share of the cores.

    Each process a launcher started on the machine gets its share of the
    cores (:func:`cores_per_device`): all of them to decode with PIL, or at
    most :data:`BYTE_WORKERS` to read bytes for the device decoder. Eight
    processes on a 96-core node run 12 workers each, not 96.
    """
    if requested is not None:
        return requested
    cores = cores_per_device()
    return min(BYTE_WORKERS, cores) if decode == "gpu" else cores


# ------------------------------------------------------------------ choosing
@functools.lru_cache(maxsize=None)
def device_decode_available(device: str) -> bool:
    """Whether ``decode_jpeg`` decodes on ``device`` (torchvision built with nvJPEG, CUDA present)."""
    target = torch.device(device)
    if target.type != "cuda" or not torch.cuda.is_available():
        return False
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, format="JPEG")
    probe = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=target)
    except RuntimeError:
        return False
    return True


def cores_per_device() -> int:
    """Cores for this process's loader: its CPU affinity shared among the processes a launcher started on this machine."""
    return max(1, default_workers() // local_processes())


def select_decode(decode: str, device: str | torch.device) -> str:
    """``"cpu"`` (PIL in the workers) or ``"gpu"`` (nvJPEG on ``device``) for a ``--decode`` choice.

    ``auto`` picks ``gpu`` only where ``device`` is a CUDA device whose
    torchvision decodes JPEGs there and the process has fewer than
    :data:`AUTO_DEVICE_BELOW_CORES` cores for it (:func:`cores_per_device`):
    with more, PIL workers were measured faster. ``gpu`` without a decoding
    device is an error.
    """
    if decode not in DECODES:
        raise ValueError(f"unknown decode {decode!r}; choose one of {list(DECODES)}")
    if decode == "cpu":
        return "cpu"
    available = device_decode_available(str(torch.device(device)))
    if decode == "gpu" and not available:
        raise ValueError(f"--decode gpu needs a CUDA device with torchvision's nvJPEG decoder; device {str(device)!r} has none "
                         "(use --decode cpu or auto)")
    if decode == "gpu":
        return "gpu"
    return "gpu" if available and cores_per_device() < AUTO_DEVICE_BELOW_CORES else "cpu"


# ------------------------------------------------------------------- bytes
class BytesDataset(ImageDataset):
    """The samples of an :class:`ImageDataset` as raw file bytes: ``{"data", "targets", "index", "seed"}``.

    ``data`` is a uint8 tensor [file size]; ``seed`` the augmentation seed of
    an ``(index, seed)`` key from :class:`EpochSampler`, or ``None`` for a
    plain index. A missing or empty file yields ``None`` with
    ``skip_bad_images`` (counted by :func:`collate_bytes`) and raises
    :class:`BadImageError` naming the file otherwise; bytes that turn out
    not to decode are handled the same way by the loaders.
    """

    def __init__(self, split: DatasetSplit, ranks: Sequence[str], *, skip_bad_images: bool = False) -> None:
        # No transform: decoding and augmentation happen on the device.
        super().__init__(split, ranks, transform=None, skip_bad_images=skip_bad_images)

    def bad_image(self, index: int, error: Exception | str) -> BadImageError:
        """The error :class:`ImageDataset` raises for an unreadable file, naming it and its image id."""
        sample = self.split.samples[index]
        return BadImageError(
            f"cannot read image {sample.image_id!r} at {self.split.path(sample)}: {error} "
            "(pass --skip-bad-images to skip and count such files)"
        )

    def read_bytes(self, index: int) -> torch.Tensor | None:
        path = self.split.readable_path(self.split.samples[index])
        try:
            data = np.fromfile(path, dtype=np.uint8)
            if data.size == 0:
                raise OSError("empty file")
        except OSError as error:
            if self.skip_bad_images:
                return None
            raise self.bad_image(index, error) from error
        return torch.from_numpy(data)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        data = self.read_bytes(index)
        if data is None:
            return None
        return {"data": data, "targets": self.targets[index], "index": index, "seed": seed}


def collate_bytes(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """One byte buffer per batch (pinned in one copy) plus the length of each file in it.

    Returns ``{"data": uint8 [total bytes], "lengths": [B], "targets": [B, R],
    "index": [B], "seed": list of B ints or None, "skipped": int}``; only
    ``skipped`` when every file of the batch was unreadable.
    """
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {"skipped": len(items) - len(kept)}
    if kept:
        batch["data"] = torch.cat([item["data"] for item in kept])
        batch["lengths"] = torch.tensor([len(item["data"]) for item in kept], dtype=torch.long)
        batch["targets"] = torch.stack([item["targets"] for item in kept])
        batch["index"] = torch.tensor([item["index"] for item in kept], dtype=torch.long)
        batch["seed"] = [item["seed"] for item in kept]
    return batch


# ------------------------------------------------------------------ decoding
_NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman
_OTHER_FRAMES = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless, hierarchical, arithmetic


def device_decodable(data: torch.Tensor) -> bool:
    """Whether a byte stream is a JPEG nvJPEG decodes as PIL would: 8-bit Huffman, grey or YCbCr, complete.

    Reads the markers up to the frame header (a few hundred bytes past any
    EXIF block). A stream without its end-of-image marker is most often a
    truncated download: PIL refuses it, nvJPEG may not, so it goes to PIL.
    """
    stream = memoryview(data.numpy())
    size = len(stream)
    if size < 4 or stream[0] != 0xFF or stream[1] != 0xD8 or stream[size - 2] != 0xFF or stream[size - 1] != 0xD9:
        return False
    position = 2
    while position + 10 <= size:
        if stream[position] != 0xFF:
            return False
        marker = stream[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in _NVJPEG_FRAMES:
            precision, components = stream[position + 4], stream[position + 9]
            return precision == 8 and components in (1, 3)
        if marker in _OTHER_FRAMES or marker == 0xDA:  # unsupported frame, or a scan before any frame
            return False
        if marker == 0xE1 and exif_orientation(stream[position + 4:position + 2 + (stream[position + 2] << 8 | stream[position + 3])]) > 1:
            return False  # nvJPEG ignores the EXIF orientation; PIL applies it (see herbarium.data.images)
        position += 2 + (stream[position + 2] << 8 | stream[position + 3])
    return False


def exif_orientation(segment: memoryview) -> int:
    """The Orientation tag of an APP1 ``Exif`` segment's first IFD (1: upright; also when there is none)."""
    data = bytes(segment)
    if not data.startswith(b"Exif\x00\x00") or len(data) < 16:
        return 1
    tiff = data[6:]
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        start = ifd + 2 + 12 * entry
        if start + 12 > len(tiff):
            break
        if int.from_bytes(tiff[start:start + 2], order) == 0x0112:
            return int.from_bytes(tiff[start + 8:start + 10], order)
    return 1


def draft_size(width: int, height: int, min_side: int | None) -> tuple[int, int]:
    """The size :func:`~herbarium.data.images.load_rgb` decodes a JPEG at (Pillow's draft mode), as (width, height).

    Draft mode scales by 1/2, 1/4 or 1/8, never below ``min_side``; the
    device path resizes to the same size so that random crops, whose
    parameters depend on the image size, are the same on both paths.
    """
    if not min_side or min(width, height) < 2 * min_side:
        return width, height
    scale = min_side / min(width, height)
    requested = (max(1, round(width * scale)), max(1, round(height * scale)))
    reduction = min(width // requested[0], height // requested[1])
    factor = next(f for f in (8, 4, 2, 1) if reduction >= f)
    return (width + factor - 1) // factor, (height + factor - 1) // factor


def _decode_with_pil(data: torch.Tensor, min_side: int | None) -> torch.Tensor:
    """What the CPU path decodes: PIL, draft mode, RGB; uint8 [3, H, W] on the CPU."""
    return F.pil_to_tensor(load_rgb(io.BytesIO(data.numpy().tobytes()), min_side))


@dataclass
class DecodedBatch:
    """Decoded images, uint8 [3, H, W] on the device, ``None`` where no decoder could read the bytes.

    ``sizes[i]``: the (height, width) the CPU path decodes image ``i`` at
    (draft mode, see :func:`draft_size`); the image itself has that size
    unless the decoder was asked to leave the reduction to the caller.
    """

    images: list[torch.Tensor | None]
    sizes: list[tuple[int, int] | None]
    errors: dict[int, str] = field(default_factory=dict)  # position in the batch -> why it failed


class GpuBatchDecoder:
    """Decodes a batch of byte tensors on ``device`` in one ``decode_jpeg`` call, with a PIL fallback.

    ``counts`` tallies the route of every image: ``device`` (the batched
    call, or one by one after a batched call failed), ``pil`` (streams the
    device decoder cannot take or failed on) and ``failed`` (not an image
    PIL can read either).

    ``decode_min_side`` reproduces the CPU path's draft-mode decoding (see
    :func:`draft_size`): PIL decodes in draft mode, and device-decoded
    images are area-reduced to the same size, here (``draft=True``) or by
    the caller in one batched step (``draft=False``, sizes in ``sizes``).
    """

    def __init__(self, device: str | torch.device, *, decode_min_side: int | None = None) -> None:
        self.device = torch.device(device)
        self.decode_min_side = decode_min_side
        self.counts: Counter[str] = Counter()

    def decode(self, datas: Sequence[torch.Tensor], draft: bool = True) -> DecodedBatch:
        """``datas``: 1-D uint8 CPU tensors, one file each."""
        batch = DecodedBatch([None] * len(datas), [None] * len(datas))
        routes = [device_decodable(data) for data in datas]
        on_device = [i for i, routed in enumerate(routes) if routed]
        with_pil = [i for i, routed in enumerate(routes) if not routed]
        try:
            decoded = decode_jpeg([datas[i] for i in on_device], mode=ImageReadMode.RGB, device=self.device) if on_device else []
        except RuntimeError:
            # One bad stream fails the whole call; find it by decoding one by one.
            decoded = []
            for i in list(on_device):
                try:
                    decoded.append(decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    on_device.remove(i)
                    with_pil.append(i)
        for i, image in zip(on_device, decoded):
            height, width = image.shape[-2:]
            width, height = draft_size(width, height, self.decode_min_side)
            batch.sizes[i] = (height, width)
            batch.images[i] = draft_image(image, (height, width)) if draft else image
        self.counts["device"] += len(on_device)
        for i in with_pil:
            try:
                image = _decode_with_pil(datas[i], self.decode_min_side)
                batch.images[i], batch.sizes[i] = image.to(self.device, non_blocking=True), tuple(image.shape[-2:])
                self.counts["pil"] += 1
            except IMAGE_ERRORS as error:
                batch.errors[i] = str(error)
                self.counts["failed"] += 1
        return batch


# ------------------------------------------------------------------- loaders
class _DeviceBatches:
    """Reads byte batches with DataLoader workers and turns each into a batch on the device.

    The workers read ahead (:func:`~herbarium.data.loader.prefetch_factor`
    batches each, pinned on CUDA); ``persistent=False`` ends them after each
    pass (validation). A background thread decodes and transforms up to ``prefetch``
    batches ahead of the one the caller is using, on a CUDA stream of its
    own, and hands a batch over only once its work is complete, so the
    training step never waits for Python or kernels it could have had
    ahead. Transforms that draw from the global generator
    (``BatchTransform.batched`` false) run on the caller's thread instead,
    one batch at a time: the generator is shared with the caller's dropout.
    Subclasses say what a batch holds (:meth:`plan` and :meth:`make`).
    """

    background = True

    def __init__(self, dataset: BytesDataset, batch_size: int, workers: int, device: str | torch.device, *,
                 sampler: Sampler | None = None, drop_last: bool = False, generator: torch.Generator | None = None,
                 decode_min_side: int | None = None, prefetch: int = PREFETCH_BATCHES, persistent: bool = True) -> None:
        self.dataset = dataset
        self.device = torch.device(device)
        self.decoder = GpuBatchDecoder(self.device, decode_min_side=decode_min_side)
        self.bytes = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers, collate_fn=collate_bytes,
            pin_memory=self.device.type == "cuda", drop_last=drop_last, persistent_workers=persistent and workers > 0,
            prefetch_factor=prefetch_factor(workers), generator=generator,
        )
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.bytes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = prefetched(iter(self.bytes), self.to_device, self.prefetch) if self.background and self.prefetch > 0 \
            else map(self.to_device, self.bytes)
        for batch in batches:
            yield self._hand_over(batch)

    def plan(self, sizes: list[tuple[int, int]], seeds: list[int | None], indices: list[int]) -> Any:
        """CPU work per sample (random parameters) for :meth:`make`."""
        raise NotImplementedError

    def make(self, decoded: Decoded, plans: Any, seeds: list[int | None], indices: list[int]) -> dict[str, torch.Tensor]:
        """The batch's device tensors, from its decoded images and :meth:`plan`'s result."""
        raise NotImplementedError

    def to_device(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A batch of :func:`collate_bytes` -> the batch :meth:`make` builds, plus targets, index and skipped; complete."""
        if "data" not in raw:
            return {"skipped": raw["skipped"]}
        if self.stream is None:
            return self._build(raw)
        with torch.cuda.stream(self.stream):
            batch = self._build(raw)
        # Complete before the caller sees it, and before torchvision's decoder, which writes on a stream of its
        # own, is handed the blocks this batch's intermediates freed on ours.
        self.stream.synchronize()
        return batch

    def _hand_over(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tell the allocator that the caller's stream uses the batch's tensors (made on ours)."""
        if self.stream is not None:
            consumer = torch.cuda.current_stream(self.device)
            for value in batch.values():
                for tensor in value if isinstance(value, list) else [value]:
                    if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                        tensor.record_stream(consumer)
        return batch

    def _build(self, raw: dict[str, Any]) -> dict[str, Any]:
        datas = raw["data"].split(raw["lengths"].tolist())
        decoded = self.decoder.decode(datas, draft=False)
        indices = raw["index"].tolist()
        for position, error in decoded.errors.items():
            if not self.dataset.skip_bad_images:
                raise self.dataset.bad_image(indices[position], error)
        keep = [i for i, image in enumerate(decoded.images) if image is not None]
        batch: dict[str, Any] = {"skipped": raw["skipped"] + len(decoded.errors)}
        if keep:
            images = Decoded([decoded.images[i] for i in keep], [decoded.sizes[i] for i in keep])
            seeds, kept_indices = [raw["seed"][i] for i in keep], [indices[i] for i in keep]
            plans = self.plan(images.sizes, seeds, kept_indices)
            batch.update(self.make(images, plans, seeds, kept_indices))
            batch["targets"] = raw["targets"][keep]
            batch["index"] = raw["index"][keep]
        return batch


class GpuLoader(_DeviceBatches):
    """Training (``train=True``: the preset, seeded per sample) or validation batches decoded on ``device``.

    Yields the CPU loader's batches, ``{"image", "targets", "index",
    "skipped"}``, with ``image`` float32 [B, 3, size, size], normalised and
    channels_last, already on ``device``; ``targets`` and ``index`` stay on
    the CPU as they do there. Pass the CPU path's ``decode_min_side`` (the
    engine's ``2 * size`` for training, ``resize_size(size)`` for
    validation) for the same images.
    """

    def __init__(self, dataset: BytesDataset, sampler: Sampler | None, batch_size: int, workers: int,
                 device: str | torch.device, preset: str, size: int, mean: Sequence[float], std: Sequence[float],
                 train: bool, *, drop_last: bool = False, generator: torch.Generator | None = None,
                 decode_min_side: int | None = None, prefetch: int = PREFETCH_BATCHES, persistent: bool = True) -> None:
        super().__init__(dataset, batch_size, workers, device, sampler=sampler, drop_last=drop_last, generator=generator,
                         decode_min_side=decode_min_side, prefetch=prefetch, persistent=persistent)
        self.transform = BatchTransform([train_ops(preset, size) if train else eval_ops(size)], size)
        self.background = self.transform.batched
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)

    def plan(self, sizes: list[tuple[int, int]], seeds: list[int | None], indices: list[int]) -> list[list[Plan]] | None:
        return self.transform.plan(sizes, [[seed] for seed in seeds])

    def make(self, decoded: Decoded, plans: Any, seeds: list[int | None], indices: list[int]) -> dict[str, torch.Tensor]:
        images = self.transform.run(decoded, plans, [[seed] for seed in seeds])[:, 0]  # [B, 3, size, size]
        return {"image": normalize(images, self.mean, self.std)}


class GpuViewLoader(_DeviceBatches):
    """TTA batches decoded on ``device``: ``{"views": [P x Tensor[B, V, 3, H, W]], "targets", "index", "skipped"}``.

    ``view_transforms[p][v]`` is the CPU-path transform of view ``v`` for
    input profile ``p`` (``tta.view_transform(view, profile)``); ``sizes``,
    ``means`` and ``stds`` are the profiles'. Batches are the ones
    ``collate_views`` makes from a ``MultiViewDataset`` over the same files:
    view ``v`` of the image at dataset index ``i`` is seeded with
    ``hash((seed, i, v))``. Every view of every image of a profile comes
    from one batched call (channels_last per view).
    """

    def __init__(self, dataset: BytesDataset, batch_size: int, workers: int, device: str | torch.device,
                 view_transforms: Sequence[Sequence[Callable]], sizes: Sequence[int], means: Sequence[Sequence[float]],
                 stds: Sequence[Sequence[float]], *, seed: int = 0, decode_min_side: int | None = None,
                 prefetch: int = PREFETCH_BATCHES) -> None:
        super().__init__(dataset, batch_size, workers, device, decode_min_side=decode_min_side, prefetch=prefetch)
        self.transforms = [BatchTransform([tensor_ops(transform) for transform in transforms], size)
                           for transforms, size in zip(view_transforms, sizes)]
        self.background = all(transform.batched for transform in self.transforms)
        self.means = [torch.tensor(mean, dtype=torch.float32, device=self.device) for mean in means]
        self.stds = [torch.tensor(std, dtype=torch.float32, device=self.device) for std in stds]
        self.seed = seed

    def plan(self, sizes: list[tuple[int, int]], seeds: list[int | None], indices: list[int]) -> list[Any]:
        return [transform.plan(sizes, view_seeds(indices, len(transform.view_ops), self.seed)) for transform in self.transforms]

    def make(self, decoded: Decoded, plans: Any, seeds: list[int | None], indices: list[int]) -> dict[str, Any]:
        views = []
        for transform, profile_plans, mean, std in zip(self.transforms, plans, self.means, self.stds):
            pixels = transform.run(decoded, profile_plans, view_seeds(indices, len(transform.view_ops), self.seed))
            views.append(normalize(pixels.flatten(0, 1), mean, std).unflatten(0, pixels.shape[:2]))
        return {"views": views}


class _MomentBatches(_DeviceBatches):
    def __init__(self, dataset: BytesDataset, batch_size: int, workers: int, device: str | torch.device, size: int) -> None:
        super().__init__(dataset, batch_size, workers, device, decode_min_side=size)
        self.transform = BatchTransform([tensor_ops(stats_transform(size))], size)
        self.background = self.transform.batched

    def plan(self, sizes: list[tuple[int, int]], seeds: list[int | None], indices: list[int]) -> list[list[Plan]] | None:
        return self.transform.plan(sizes, [[None]] * len(sizes))

    def make(self, decoded: Decoded, plans: Any, seeds: list[int | None], indices: list[int]) -> dict[str, torch.Tensor]:
        return {"moments": image_moments(self.transform.run(decoded, plans, [[None]] * len(decoded.images))[:, 0])}


def gpu_moment_batches(split: DatasetSplit, size: int, workers: int, batch_size: int, device: str | torch.device,
                       skip_bad_images: bool = False) -> Iterator[tuple[torch.Tensor, int]]:
    """collect-stats on the device: ``(moments [B, 3 (count, mean, m2), 3] float64 on the CPU, skipped)`` per batch.

    The pixels are ``stats_transform(size)``'s (shorter side to ``size``,
    centre crop, [0, 1]), so the pairs are those ``compute_stats`` merges.
    """
    dataset = BytesDataset(split, split.taxonomy.ranks, skip_bad_images=skip_bad_images)
    for batch in _MomentBatches(dataset, batch_size, workers, device, size):
        moments = batch["moments"].cpu() if "moments" in batch else torch.zeros(0, 3, 3, dtype=torch.float64)
        yield moments, batch["skipped"]
