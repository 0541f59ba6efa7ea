#!/usr/bin/env python
"""Input-pipeline throughput against the model's own speed, measured in one run.

Writes Herbarium-sized JPEGs (1000 x 661 px, about 180 KB) in the Herbarium
2020 layout under a temporary folder, then measures, in images per second:

a. the model-only training step: batches already on the device (bf16
   autocast on CUDA, channels_last, optionally compiled);
b. each input path alone (its loader, no model) and end-to-end training
   through it: ``cpu`` (PIL in DataLoader workers on every core, the
   engine's own loaders) and ``gpu`` (bytes from the workers, nvJPEG decode
   and batched augmentation on the device, a batch ahead of the step);
c. 4-view TTA evaluation through each path, and the inference ceiling
   (forward passes on device tensors) divided by the number of views;
d. collect-stats through each path.

(a)-(c) run for the main model (SE-ResNeXt50 at 224 px) and for a small
one (``efficientnet_lite0`` at 128 px), each against its own model-only
speed: a small model shows where the input path, not the model, is the
bound. Each figure is printed as soon as it is measured, and the JSON is
written after each model, so a run stopped by a time limit keeps what it
finished. On one H200 (2026-12-04) the compiled run of the main model took
under 3 minutes, but efficientnet_lite0's compiled training step had not
finished after 115 s more (its compile takes about 3 minutes on a 2-core
CPU at 32 px): with a
tight limit, run the main model compiled with ``--small-trunk none`` and the
small one eagerly in a second run.

Every training figure uses the engine's step: the model, the MultiRankLoss,
the phased optimizer and the NaN guard. Each figure is the median of several
timed windows after a warm-up, with the device synchronised before every
clock read. Training samples cycle over the files so that no epoch boundary
falls inside a measurement; the files stay in the page cache.

    python bench/throughput.py --device cuda --compile --small-trunk none   # the main model, compiled
    python bench/throughput.py --device cuda --trunk efficientnet_lite0 --size 128 --small-trunk none  # the small one
    python bench/throughput.py --device cpu --trunk resnet10t --size 64 --batch-size 16 --images 64 \
        --small-trunk mobilenetv3_small_050 --small-size 32 --classes 50,10,5 --paths cpu,gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import timm
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from herbarium.build import build_loaders
from herbarium.config import DataConfig, LossConfig, TrainConfig
from herbarium.data.gpu import device_decode_available, gpu_moment_batches
from herbarium.data.readers import DatasetSplit, read_split
from herbarium.data.samplers import EpochSampler
from herbarium.distributed import DistributedContext
from herbarium.engine import NanGuard, forward_loss
from herbarium.evaluation.runner import LoadedModel, build_view_loader, model_scores
from herbarium.evaluation.settings import EVAL_BATCH, EvaluationSettings
from herbarium.evaluation.tta import InputProfile, parse_views, plain_view_index
from herbarium.losses import build_multi_rank_loss
from herbarium.models import ModelConfig, build_model
from herbarium.optim import PhasedOptimizer, parse_phases, parse_schedule
from herbarium.runtime import autocast, autocast_dtype, default_workers, resolve_device
from herbarium.stats import ChannelMoments, compute_stats
from herbarium.stats_file import imagenet_normalization
from herbarium.taxonomy import DEFAULT_RANKS, Taxonomy

SHEET_SIZE = (1000, 661)  # (width, height) of a Herbarium 2020 image
SHEET_QUALITY = 90
SHEET_NOISE = 7.0  # grey levels of sensor noise; sets the file size (about 180 KB at quality 90)
HERBARIUM_2020_CLASSES = (32093, 3678, 310)  # species, genera, families
# (warm-up steps, timed windows, steps per window) by device type: a GPU needs compile and cudnn warm-up
# and runs many steps a second; a CPU run is a functional check that has to end in minutes.
TIMING = {"cuda": (8, 3, 8), "cpu": (3, 3, 2)}
LEVELS = ("species", "genus", "family")  # the heads, in the engine's default order


# ---------------------------------------------------------------------- data
def herbarium_sheet(seed: int, size: tuple[int, int] = SHEET_SIZE, quality: int = SHEET_QUALITY,
                    noise: float = SHEET_NOISE) -> bytes:
    """JPEG bytes of a synthetic herbarium sheet: paper, a plant of stems and leaves, a label, sensor noise.

    Structure and noise together give the file the size and entropy of a
    real sheet, which is what sets the cost of decoding it.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    shade = 4 * np.sin(xs / rng.uniform(40, 90) + rng.uniform(0, 6)) + 3 * np.cos(ys / rng.uniform(30, 70))
    paper = np.array([226, 219, 198], np.float32) + shade[..., None]
    sheet = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(sheet)
    centre_x, centre_y = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.3, 0.7)
    for _ in range(int(rng.integers(25, 45))):  # a stem ending in a leaf
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.06, 0.3) * width
        x0, y0 = centre_x + rng.normal(0, 0.08 * width), centre_y + rng.normal(0, 0.09 * height)
        x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
        colour = tuple(int(c) for c in rng.integers((30, 60, 20), (110, 130, 70)))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(2, 7)))
        radius = rng.uniform(8, 30)
        draw.ellipse([x1 - radius, y1 - radius / 2, x1 + radius, y1 + radius / 2], fill=colour)
    label_x, label_y = width * 0.68, height * 0.78
    draw.rectangle([label_x, label_y, label_x + 0.28 * width, label_y + 0.18 * height], fill=(245, 243, 235), outline=(60, 60, 60))
    for row in range(6):
        for word in range(int(rng.integers(3, 7))):
            x, y = label_x + 10 + word * 42 + rng.uniform(0, 6), label_y + 12 + row * 17
            draw.rectangle([x, y, x + rng.uniform(15, 36), y + 8], fill=(40, 40, 50))
    pixels = np.asarray(sheet.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
    pixels += rng.normal(0, noise, pixels.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _write_sheet(task: tuple[Path, int]) -> int:
    path, seed = task
    data = herbarium_sheet(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def write_sheets(data: Path, count: int, classes: tuple[int, int, int] = HERBARIUM_2020_CLASSES,
                 workers: int = 0) -> list[int]:
    """``count`` sheets in the Herbarium 2020 layout under ``data/train``; returns the file sizes in bytes.

    Every category of a Herbarium-sized taxonomy is written (most without
    images), so the heads are as large as in the competition.
    """
    species, genera, families = classes
    categories = [{"id": s, "name": f"Genus{s % genera} species{s}", "genus": f"Genus{s % genera}",
                   "family": f"Family{(s % genera) % families}"} for s in range(species)]
    images, annotations, tasks = [], [], []
    for image_id in range(count):
        file_name = f"images/{image_id % 100:03d}/{image_id}.jpg"
        tasks.append((data / "train" / file_name, image_id))
        images.append({"id": image_id, "file_name": file_name, "width": SHEET_SIZE[0], "height": SHEET_SIZE[1]})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": image_id % species})
    if workers > 0:
        with multiprocessing.Pool(workers) as pool:
            sizes = pool.map(_write_sheet, tasks, chunksize=8)
    else:
        sizes = [_write_sheet(task) for task in tasks]
    (data / "train" / "metadata.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return sizes


def cycled(split: DatasetSplit, samples: int) -> DatasetSplit:
    """``split`` with its samples repeated up to ``samples``: long epochs over few files."""
    repeats = -(-samples // len(split))
    return dataclasses.replace(split, samples=(split.samples * repeats)[:max(samples, len(split))])


# -------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Window:
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def median_rate(windows: Sequence[Window]) -> float:
    """Median images per second over timed windows."""
    if not windows:
        raise ValueError("no timed window")
    return statistics.median(window.rate for window in windows)


def time_windows(step: Callable[[], int], *, warmup: int, windows: int, steps: int,
                 synchronize: Callable[[], None]) -> list[Window]:
    """Run ``warmup`` steps, then ``windows`` windows of ``steps`` steps; ``step()`` returns its image count."""
    for _ in range(warmup):
        step()
    synchronize()
    timed = []
    for _ in range(windows):
        started, images = time.perf_counter(), 0
        for _ in range(steps):
            images += step()
        synchronize()
        timed.append(Window(images, time.perf_counter() - started))
    return timed


def record(timed: dict[str, list[Window]], name: str, measure: Callable[[], list[Window]]) -> None:
    """Take one measurement into ``timed`` and print its rate at once: a run stopped part-way keeps what it measured."""
    started = time.perf_counter()
    timed[name] = measure()
    print(f"  {name}: {median_rate(timed[name]):,.1f} images/s (measured in {time.perf_counter() - started:.0f} s, "
          "warm-up and compile included)", flush=True)


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def endless(loader: Iterable[dict[str, Any]], sampler: EpochSampler | None = None) -> Iterator[dict[str, Any]]:
    """Batches of ``loader``, epoch after epoch, skipping batches whose images were all unreadable."""
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            if "image" in batch or "views" in batch:
                yield batch
        epoch += 1


# ------------------------------------------------------------------ training
@dataclass
class TrainParts:
    """What the engine's training step needs."""

    model: nn.Module  # the module whose weights are trained
    train_model: nn.Module  # the same, compiled when asked
    loss_fn: nn.Module
    optimizer: PhasedOptimizer
    guard: NanGuard
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool = True

    def step(self, batch: dict[str, Any]) -> int:
        """One optimizer step on ``batch``, as ``Trainer`` takes it; returns the batch's image count."""
        result = forward_loss(self.train_model, self.loss_fn, batch, LEVELS, self.device, self.dtype, self.channels_last)
        result.total.backward()
        self.guard.defer(self.optimizer.global_step + 1, 0, result.finite)  # the engine's 'stop' policy: no sync per step
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return len(batch["image"])


def build_train_parts(trunk: str, taxonomy: Taxonomy, split: DatasetSplit, device: torch.device, compile_model: bool) -> TrainParts:
    """The Trainer's model, loss and optimizer with the library's defaults."""
    model = build_model(ModelConfig(pretrained=False, trunk=trunk), {rank: taxonomy.num_classes(rank) for rank in LEVELS}).to(device)
    model = model.to(memory_format=torch.channels_last)
    loss = LossConfig(levels=LEVELS)
    category_ids = split.category_ids()
    loss_fn = build_multi_rank_loss(
        loss.loss_by_rank(), {rank: taxonomy.counts(category_ids, rank) for rank in LEVELS},
        {rank: loss.weight_of(rank) for rank in LEVELS}, loss.class_weights,
        gamma=loss.gamma, smoothing=loss.smoothing, tau=loss.tau, beta=loss.beta,
    ).to(device)
    defaults = TrainConfig().optim
    optimizer = PhasedOptimizer(model.parameters(), parse_phases(defaults.optim), parse_schedule("constant"), 1000, 1)
    train_model = torch.compile(model) if compile_model else model
    return TrainParts(model, train_model, loss_fn, optimizer, NanGuard("stop"), device, autocast_dtype("auto", device))


def synthetic_batch(batch_size: int, size: int, taxonomy: Taxonomy, device: torch.device) -> dict[str, torch.Tensor]:
    """A training batch already on the device: normal pixels, random labels of every rank."""
    generator = torch.Generator().manual_seed(0)
    categories = torch.randint(0, len(taxonomy.category_ids), (batch_size,), generator=generator)
    table = torch.as_tensor(taxonomy.path_table(LEVELS))  # [categories, len(LEVELS)]
    image = torch.randn(batch_size, 3, size, size, generator=generator).to(device, memory_format=torch.channels_last)
    return {"image": image, "targets": table[categories].to(device)}


# ----------------------------------------------------------------- measuring
@dataclass
class Settings:
    device: torch.device
    trunk: str
    size: int
    batch_size: int
    eval_batch_size: int
    views: tuple[str, ...]
    workers: int
    byte_workers: int
    warmup: int
    windows: int
    steps: int
    paths: tuple[str, ...]

    @property
    def step_count(self) -> int:
        return self.warmup + self.windows * self.steps


def measure_model_only(parts: TrainParts, taxonomy: Taxonomy, settings: Settings) -> list[Window]:
    batch = synthetic_batch(settings.batch_size, settings.size, taxonomy, settings.device)
    return time_windows(lambda: parts.step(batch), warmup=settings.warmup, windows=settings.windows, steps=settings.steps,
                        synchronize=synchronizer(settings.device))


def train_loader(path: str, data: Path, split: DatasetSplit, settings: Settings):
    """(loader, sampler) of an input path: the engine's own training loader."""
    workers = settings.workers if path == "cpu" else settings.byte_workers
    cfg = TrainConfig(data=DataConfig(data=str(data), size=settings.size, batch_size=settings.batch_size, workers=workers),
                      loss=LossConfig(levels=LEVELS))
    loaders = build_loaders(cfg, split, split, imagenet_normalization(), DistributedContext(), settings.device, decode=path)
    return loaders.train, loaders.sampler


def measure_end_to_end(parts: TrainParts, loader, sampler: EpochSampler, settings: Settings) -> list[Window]:
    batches = endless(loader, sampler)
    return time_windows(lambda: parts.step(next(batches)), warmup=settings.warmup, windows=settings.windows,
                        steps=settings.steps, synchronize=synchronizer(settings.device))


def measure_input_only(loader, sampler: EpochSampler, settings: Settings) -> list[Window]:
    """The input path alone: batches taken from the training loader as fast as it makes them, no model."""
    batches = endless(loader, sampler)
    return time_windows(lambda: len(next(batches)["image"]), warmup=settings.warmup, windows=settings.windows,
                        steps=settings.steps, synchronize=synchronizer(settings.device))


def measure_inference_ceiling(model: nn.Module, settings: Settings) -> list[Window]:
    """Forward passes on device tensors, at the TTA model batch (images x views)."""
    batch = settings.eval_batch_size * len(settings.views)
    images = torch.randn(batch, 3, settings.size, settings.size).to(settings.device, memory_format=torch.channels_last)
    dtype = autocast_dtype("auto", settings.device)

    def forward() -> int:
        with torch.inference_mode(), autocast(settings.device, dtype):
            model(images)
        return batch

    return time_windows(forward, warmup=settings.warmup, windows=settings.windows, steps=settings.steps,
                        synchronize=synchronizer(settings.device))


def view_loader(path: str, split: DatasetSplit, loaded: LoadedModel, settings: Settings):
    """The evaluation runner's own loader of TTA views for an input path."""
    workers = settings.workers if path == "cpu" else settings.byte_workers
    evaluation = EvaluationSettings(views=settings.views, batch_size=settings.eval_batch_size, workers=workers)
    return build_view_loader(split, split.taxonomy, [loaded], evaluation, settings.device, decode=path)


def measure_tta(loaded: LoadedModel, loader, settings: Settings) -> list[Window]:
    """The evaluation runner's per-batch work: every view through the model, averaged per image."""
    batches = endless(loader)
    plain = plain_view_index(settings.views)
    dtype = autocast_dtype("auto", settings.device)

    def evaluate_batch() -> int:
        batch = next(batches)
        with torch.inference_mode():
            model_scores(loaded, batch["views"][0], "logits", plain, settings.device, dtype)
        return len(batch["index"])

    return time_windows(evaluate_batch, warmup=settings.warmup, windows=settings.windows, steps=settings.steps,
                        synchronize=synchronizer(settings.device))


def measure_stats(path: str, split: DatasetSplit, settings: Settings, batch_size: int = 64) -> list[Window]:
    """Whole collect-stats passes over the files (each pass starts its own workers, as the command does)."""
    timed = []
    for _ in range(settings.windows):
        started = time.perf_counter()
        if path == "cpu":
            images = compute_stats(split, settings.size, settings.workers, batch_size, progress=False)["num_images"]
        else:
            moments, images = ChannelMoments(), 0
            for batch, _ in gpu_moment_batches(split, settings.size, settings.byte_workers, batch_size, settings.device):
                for count, mean, m2 in batch.numpy():
                    moments.merge(count[0], mean, m2)
                images += len(batch)
        timed.append(Window(images, time.perf_counter() - started))
    return timed


# ------------------------------------------------------------------ reporting
def hardware(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": default_workers(), "device": str(device), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["nvjpeg_decode"] = device_decode_available(str(device))
    return info


def model_table(model: dict[str, Any], views: int, paths: Sequence[str]) -> list[tuple[str, float, str]]:
    """Rows of one model's figures: (what, images/s, ratio)."""
    rates, ratios = model["images_per_s"], model["ratios"]
    rows = [(f"{model['trunk']} at {model['size']} px, model-only training step", rates["model_only_train"], "")]
    for path in paths:
        rows.append((f"  {path} input path alone (no model)", rates[f"input_{path}"],
                     f"{ratios[f'input_{path}']:.3f} of model-only"))
        rows.append((f"  end-to-end training, {path} input path", rates[f"train_{path}"],
                     f"{ratios[f'train_{path}']:.3f} of model-only"))
    rows.append((f"  inference ceiling (model batch {model['eval_batch_size'] * views})", rates["inference_ceiling"], ""))
    rows.append((f"  inference ceiling / {views} views", rates["inference_ceiling"] / views, ""))
    for path in paths:
        rows.append((f"  TTA evaluation ({views} views), {path} input path", rates[f"tta_{path}"],
                     f"{ratios[f'tta_{path}']:.3f} of ceiling / {views}"))
    return rows


def table(results: dict[str, Any]) -> str:
    paths, views = results["settings"]["paths"], len(results["settings"]["views"])
    rows = [row for model in results["models"].values() for row in model_table(model, views, paths)]
    rows += [(f"collect-stats, {path} input path", results["images_per_s"][f"stats_{path}"], "") for path in paths]
    width = max(len(row[0]) for row in rows)
    lines = [f"{'what':<{width}}  {'images/s':>10}  ratio", "-" * (width + 30)]
    lines += [f"{name:<{width}}  {rate:>10.1f}  {ratio}" for name, rate, ratio in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------- run
def resolve_settings(args: argparse.Namespace) -> Settings:
    device = resolve_device(args.device)
    if args.paths == "auto":
        paths = ("cpu", "gpu") if device_decode_available(str(device)) else ("cpu",)
    else:
        paths = tuple(args.paths.split(","))
    unknown = set(paths) - {"cpu", "gpu"}
    if unknown:
        raise SystemExit(f"--paths: unknown input path(s) {sorted(unknown)}; choose from cpu, gpu")
    warmup, windows, steps = (given if given is not None else default
                              for given, default in zip((args.warmup, args.windows, args.steps), TIMING[device.type]))
    return Settings(device, args.trunk, args.size, args.batch_size, args.eval_batch_size or EVAL_BATCH.get(device.type, EVAL_BATCH["cpu"]),
                    parse_views(args.views), args.workers or default_workers(), args.byte_workers or min(4, default_workers()),
                    warmup, windows, steps, paths)


def model_settings(settings: Settings, args: argparse.Namespace) -> dict[str, Settings]:
    """The settings of each model measured: the main one, and the small one unless ``--small-trunk none``."""
    models = {"main": settings}
    if args.small_trunk != "none":
        models["small"] = dataclasses.replace(settings, trunk=args.small_trunk, size=args.small_size,
                                              batch_size=args.small_batch_size or settings.batch_size)
    return models


def measure_training(parts: TrainParts, data: Path, files: DatasetSplit, settings: Settings,
                     timed: dict[str, list[Window]], routes: dict[str, dict[str, int]]) -> None:
    """(a) and (b): the model alone, then each input path alone and feeding the same training step."""
    print(f"{settings.trunk}: model-only training step ...", flush=True)
    record(timed, "model_only_train", lambda: measure_model_only(parts, files.taxonomy, settings))
    samples = cycled(files, (2 * settings.step_count + 2) * settings.batch_size)
    for path in settings.paths:
        print(f"{settings.trunk}: {path} input path alone, then end-to-end training ...", flush=True)
        loader, sampler = train_loader(path, data, samples, settings)
        record(timed, f"input_{path}", lambda: measure_input_only(loader, sampler, settings))
        record(timed, f"train_{path}", lambda: measure_end_to_end(parts, loader, sampler, settings))
        if path == "gpu":
            routes["train"] = dict(loader.decoder.counts)


def measure_evaluation(model: nn.Module, files: DatasetSplit, settings: Settings,
                       timed: dict[str, list[Window]], routes: dict[str, dict[str, int]]) -> None:
    """(c): the inference ceiling, then TTA through each input path, with the same (eager) model."""
    model.eval()
    normalization = imagenet_normalization()
    profile = InputProfile(settings.size, normalization.mean, normalization.std, DataConfig().augment)
    loaded = LoadedModel(model, TrainConfig(), files.taxonomy, profile, {}, Path("bench"))
    print(f"{settings.trunk}: inference ceiling ...", flush=True)
    record(timed, "inference_ceiling", lambda: measure_inference_ceiling(model, settings))
    samples = cycled(files, (settings.step_count + 2) * settings.eval_batch_size)
    for path in settings.paths:
        print(f"{settings.trunk}: TTA evaluation, {path} input path ...", flush=True)
        loader = view_loader(path, samples, loaded, settings)
        record(timed, f"tta_{path}", lambda: measure_tta(loaded, loader, settings))
        if path == "gpu":
            routes["tta"] = dict(loader.decoder.counts)


def measure_model(settings: Settings, data: Path, files: DatasetSplit, compile_model: bool) -> dict[str, Any]:
    """(a)-(c) for one model: rates, ratios to its own model-only speed and ceiling, decoder routes, windows."""
    parts = build_train_parts(settings.trunk, files.taxonomy, files, settings.device, compile_model)
    timed: dict[str, list[Window]] = {}
    routes: dict[str, dict[str, int]] = {}
    measure_training(parts, data, files, settings, timed, routes)
    measure_evaluation(parts.model, files, settings, timed, routes)
    rates = {name: median_rate(windows) for name, windows in timed.items()}
    views = len(settings.views)
    ratios = {f"{kind}_{path}": rates[f"{kind}_{path}"] / rates["model_only_train"]
              for kind in ("input", "train") for path in settings.paths}
    ratios.update({f"tta_{path}": rates[f"tta_{path}"] / (rates["inference_ceiling"] / views) for path in settings.paths})
    del parts
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"trunk": settings.trunk, "size": settings.size, "batch_size": settings.batch_size,
            "eval_batch_size": settings.eval_batch_size, "images_per_s": rates, "ratios": ratios,
            "gpu_decoder_routes": routes,
            "windows": {name: [dataclasses.asdict(window) for window in windows] for name, windows in timed.items()}}


def run(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Write the sheets, take every measurement, and return the results record."""
    settings = resolve_settings(args)
    if settings.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    classes = tuple(int(n) for n in args.classes.split(","))
    sizes = write_sheets(data, args.images, classes, workers=default_workers())
    mean_kb = sum(sizes) / len(sizes) / 1024
    print(f"wrote {len(sizes)} sheets of {SHEET_SIZE[0]}x{SHEET_SIZE[1]} px, mean {mean_kb:.0f} KB "
          f"(min {min(sizes) / 1024:.0f}, max {max(sizes) / 1024:.0f}) in {time.perf_counter() - started:.1f} s", flush=True)

    files = read_split(data, "train", DEFAULT_RANKS)
    header = run_header(args, settings, classes, sizes)
    models = {}
    for name, model in model_settings(settings, args).items():
        models[name] = measure_model(model, data, files, args.compile)
        write_results(args.out, {**header, "models": models, "complete": False})  # kept if the run is stopped later
    stats_windows = {}
    for path in settings.paths:  # (d)
        print(f"collect-stats, {path} input path ...", flush=True)
        record(stats_windows, f"stats_{path}", lambda: measure_stats(path, files, settings))
    return {
        **header,
        "complete": True,
        "models": models,
        "images_per_s": {name: median_rate(windows) for name, windows in stats_windows.items()},
        "targets": {"main": {"train_gpu": 0.90, "tta_gpu": 0.90}},
        "stats_windows": {name: [dataclasses.asdict(window) for window in windows] for name, windows in stats_windows.items()},
        "seconds": time.perf_counter() - started,
    }


def run_header(args: argparse.Namespace, settings: Settings, classes: tuple[int, ...], sizes: list[int]) -> dict[str, Any]:
    """What a results record says about the run before any measurement: command, hardware, settings, data."""
    mean_kb = sum(sizes) / len(sizes) / 1024
    return {
        "benchmark": "throughput",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hardware": hardware(settings.device),
        "settings": {**{k: (str(v) if isinstance(v, torch.device) else v) for k, v in dataclasses.asdict(settings).items()},
                     "compile": args.compile, "images": args.images, "classes": list(classes),
                     "precision": str(autocast_dtype("auto", settings.device) or "fp32"), "channels_last": True},
        "data": {"sheet_size": list(SHEET_SIZE), "jpeg_quality": SHEET_QUALITY, "mean_file_kb": mean_kb,
                 "min_file_kb": min(sizes) / 1024, "max_file_kb": max(sizes) / 1024},
    }


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    setup = parser.add_argument_group("what to measure")
    setup.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto, CUDA when present)")
    setup.add_argument("--trunk", default="legacy_seresnext50_32x4d", help="timm trunk (default: legacy_seresnext50_32x4d)")
    setup.add_argument("--size", type=int, default=224, help="training and evaluation input side (default: 224)")
    setup.add_argument("--batch-size", type=int, default=256, help="training batch (default: 256)")
    setup.add_argument("--eval-batch-size", type=int, default=None,
                       help="TTA batch in images; the model sees images x views (default: the evaluator's, 128 on CUDA, 32 on CPU)")
    setup.add_argument("--small-trunk", default="efficientnet_lite0",
                       help="a small model measured as well, against its own model-only speed; none to skip (default: efficientnet_lite0)")
    setup.add_argument("--small-size", type=int, default=128, help="input side of the small model (default: 128)")
    setup.add_argument("--small-batch-size", type=int, default=None, help="training batch of the small model (default: --batch-size)")
    setup.add_argument("--views", default="4", help="TTA views, as evaluate's --views (default: 4: train,train,train,plain)")
    setup.add_argument("--compile", action="store_true", help="torch.compile the training model (default: off)")
    setup.add_argument("--paths", default="auto", help="input paths to measure, e.g. cpu,gpu (default: auto: gpu too when nvJPEG is available)")
    setup.add_argument("--classes", default=",".join(map(str, HERBARIUM_2020_CLASSES)),
                       help="species,genera,families of the heads (default: Herbarium 2020's 32093,3678,310)")
    data = parser.add_argument_group("data and timing")
    data.add_argument("--images", type=int, default=1024, help="distinct JPEG files to write (default: 1024)")
    data.add_argument("--workers", type=int, default=None, help="CPU-path decoding workers (default: all cores)")
    data.add_argument("--byte-workers", type=int, default=None, help="GPU-path workers reading bytes (default: min(4, cores))")
    data.add_argument("--warmup", type=int, default=None, help="steps before timing, per measurement (default: 8 on CUDA, 3 on CPU)")
    data.add_argument("--windows", type=int, default=None, help="timed windows per measurement; the median is reported (default: 3)")
    data.add_argument("--steps", type=int, default=None, help="steps per timed window (default: 8 on CUDA, 2 on CPU)")
    data.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"),
                      help="JSON file for the results (default: bench/results/throughput.json)")
    data.add_argument("--tmp", type=Path, default=None, help="folder for the generated images (default: a temporary folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    with tempfile.TemporaryDirectory(prefix="herbarium-bench-", dir=args.tmp) as folder:
        results = run(args, Path(folder))
    print()
    print(table(results))
    write_results(args.out, results)
    print(f"\nwritten to {args.out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
