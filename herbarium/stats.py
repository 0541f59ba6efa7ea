"""``collect-stats``: exact per-channel mean/std of a split, and class counts per rank.

Pixels are measured as the model sees them: decoded, resized so the shorter
side is ``size`` and centre-cropped to ``size`` x ``size``, in [0, 1]. Each
image contributes its own float64 mean and sum of squared deviations, and
the per-image moments are merged with Chan et al.'s parallel update, which
stays accurate over millions of images where a running sum of squares in
float32 would not.

``--sample N`` measures a seeded random subset of N images instead,
stratified over classes (:func:`~herbarium.data.splits.stratified_sample`),
and reports the standard error of its mean and std, so the minutes saved
can be weighed against the precision lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from herbarium.arguments import ArgumentParser
from herbarium.data.dataset import ImageDataset
from herbarium.data.gpu import DECODES, gpu_moment_batches, loader_workers, select_decode
from herbarium.data.loader import prefetch_factor
from herbarium.data.readers import DatasetSplit, read_split
from herbarium.data.sample_table import class_counts, take_samples
from herbarium.data.splits import stratified_sample
from herbarium.data.transforms import stats_transform
from herbarium.errors import UsageError, command
from herbarium.runtime import default_workers
from herbarium.stats_file import default_stats_path
from herbarium.taxonomy import DEFAULT_RANKS
from herbarium.terminal import show_progress

PROGRESS = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images [{elapsed} elapsed, {remaining} left, {rate_fmt}]"


@dataclass
class ChannelMoments:
    """Count, mean and sum of squared deviations per channel (float64)."""

    count: float = 0.0
    mean: np.ndarray = None  # [3]
    m2: np.ndarray = None  # [3]

    def merge(self, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al. (1979) pairwise update."""
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean.copy(), m2.copy()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count)


class _ImageMoments:
    """Turns an image tensor into its (count, mean, m2) per channel, inside the workers."""

    def __init__(self, size: int) -> None:
        self.transform = stats_transform(size)

    def __call__(self, image) -> torch.Tensor:
        pixels = self.transform(image).double().flatten(1)  # [3, H*W]
        mean = pixels.mean(dim=1)
        m2 = ((pixels - mean[:, None]) ** 2).sum(dim=1)
        count = torch.full((3,), float(pixels.shape[1]), dtype=torch.float64)
        return torch.stack([count, mean, m2])  # [3 (count, mean, m2), 3 channels]


def compute_stats(split: DatasetSplit, size: int = 224, workers: int | None = None, batch_size: int = 64,
                  skip_bad_images: bool = False, progress: bool = True, decode: str = "cpu", device: str = "cpu",
                  sample: int | None = None, seed: int = 0) -> dict:
    """Exact mean/std over every image of ``split`` (or of a stratified ``sample`` of it) plus class counts per rank.

    ``decode='gpu'`` (or ``auto`` with a CUDA device) decodes with nvJPEG on
    the device; the per-image moments are the same, merged the same way.
    With ``sample`` the result also holds ``sample`` (how many of how many
    images, the seed) and the standard errors of the mean and std.
    """
    whole = split
    if sample is not None and sample < len(split):
        split = dataclasses.replace(split, samples=take_samples(split.samples, stratified_sample(split, sample, seed)))
    path = select_decode(decode, torch.device(device))
    workers = loader_workers(workers, path)
    if path == "gpu":
        loader = gpu_moment_batches(split, size, workers, batch_size, device, skip_bad_images)
    else:
        dataset = ImageDataset(split, split.taxonomy.ranks, _ImageMoments(size), decode_min_side=size, skip_bad_images=skip_bad_images)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate_moments,
                            persistent_workers=False, prefetch_factor=prefetch_factor(workers))
    moments, skipped, seen, per_image = ChannelMoments(), 0, 0, []
    start = time.perf_counter()
    with tqdm(total=len(split), unit="img", desc=f"collect-stats {split.name}", disable=not show_progress(not progress),
              bar_format=PROGRESS) as bar:
        for batch, batch_skipped in loader:
            rows = batch.numpy()  # [B, 3 (count, mean, m2), 3 channels]
            if split is not whole:
                per_image.append(rows)
            for count, mean, m2 in rows:
                moments.merge(count[0], mean, m2)
            skipped += batch_skipped
            seen += len(batch) + batch_skipped
            bar.update(len(batch) + batch_skipped)
    seconds = time.perf_counter() - start
    if moments.count == 0:
        raise ValueError(f"no readable image in split {split.name!r} of {split.source}")
    sampled = {} if split is whole else {"sample": sample_errors(np.concatenate(per_image), moments, len(whole), seed)}
    return {
        "mean": moments.mean.tolist(),
        "std": moments.std.tolist(),
        **sampled,
        "size": size,
        "split": split.name,
        "source": str(split.source),
        "num_images": seen - skipped,
        "skipped_bad_images": skipped,
        "ranks": list(split.taxonomy.ranks),
        "class_counts": _class_counts(whole),
        "images_per_s": seen / seconds if seconds > 0 else None,
        "seconds": seconds,
        "workers": workers,
        "input_path": path,
        "hardware": f"{platform.processor() or platform.machine()}, {default_workers()} cores",
    }


def sample_errors(rows: np.ndarray, moments: ChannelMoments, population: int, seed: int) -> dict:
    """Standard errors of a sample's per-channel mean and std, as estimates of the whole split's.

    ``rows``: [n, 3 (count, mean, m2), 3] per image. Every image is cropped
    to the same size, so the split's mean is the mean of the images' means
    and its variance the mean of ``m2 / count + (image mean - mean)^2``; the
    errors are those of these two means over n images drawn without
    replacement (the finite population correction), the std's by the delta
    method. Stratifying over classes only lowers the true error, so these
    are if anything too large.
    """
    n = len(rows)
    means, spread = rows[:, 1], rows[:, 2] / rows[:, 0] + (rows[:, 1] - moments.mean) ** 2  # [n, 3] each
    correction = np.sqrt(max(0.0, 1 - n / population) / n) if n > 1 else np.inf
    mean_error = means.std(axis=0, ddof=1) * correction if n > 1 else np.full(3, np.inf)
    variance_error = spread.std(axis=0, ddof=1) * correction if n > 1 else np.full(3, np.inf)
    return {"images": n, "of": population, "seed": seed, "mean_standard_error": mean_error.tolist(),
            "std_standard_error": (variance_error / (2 * moments.std)).tolist()}


def _collate_moments(items):
    kept = [item["image"] for item in items if item is not None]
    stacked = torch.stack(kept) if kept else torch.zeros(0, 3, 3, dtype=torch.float64)
    return stacked, len(items) - len(kept)


def _class_counts(split: DatasetSplit) -> dict[str, dict[str, int]]:
    """{rank: {class name: count}} over the labelled images of the split.

    Finest-rank names may repeat (one epithet under two genera); those classes
    are keyed ``"name [category id]"`` so that none is lost.
    """
    taxonomy = split.taxonomy
    counts = {}
    for rank in taxonomy.ranks:
        names = taxonomy.names[rank]
        if rank == taxonomy.finest:
            repeated = {name for name, n in Counter(names).items() if n > 1}
            names = [f"{name} [{cid}]" if name in repeated else name for name, cid in zip(names, taxonomy.category_ids)]
        counts[rank] = dict(zip(names, class_counts(split.samples, taxonomy, rank)))
    return counts


def write_stats(stats: dict, out: Path) -> None:
    """Write atomically, so a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, out)


def summary(stats: dict, out: Path) -> str:
    fmt = lambda values: "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
    sample = stats.get("sample")
    measured = f"a stratified sample of {sample['images']:,} of the {sample['of']:,} images (seed {sample['seed']})" \
        if sample else f"{stats['num_images']} images"
    lines = [
        f"{measured} of split {stats['split']!r} at {stats['size']} px"
        + (f", {stats['skipped_bad_images']} unreadable skipped" if stats["skipped_bad_images"] else ""),
        f"mean {fmt(stats['mean'])}  std {fmt(stats['std'])}",
        f"{stats['images_per_s']:.0f} images/s with {stats['workers']} workers ({stats['seconds']:.1f} s)",
    ]
    if sample:
        lines.insert(2, f"standard error: mean {fmt(sample['mean_standard_error'])}  std {fmt(sample['std_standard_error'])} "
                        "(the full pass, without --sample, is exact)")
    for rank, counts in stats["class_counts"].items():
        values = sorted(counts.values())
        lines.append(f"{rank:>10}: {len(values)} classes, per class min {values[0]} / median {values[len(values) // 2]} / max {values[-1]}")
    lines.append(f"written to {out}")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or ArgumentParser(prog="collect-stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="dataset folder (or a split folder holding metadata.json)")
    parser.add_argument("--split", default="train", help="split to measure (default: train)")
    parser.add_argument("--size", type=int, default=224, help="side the images are resized and centre-cropped to (default: 224)")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default: DATA/<split>/stats.json)")
    parser.add_argument("--ranks", default=",".join(DEFAULT_RANKS), help=f"rank names, coarse to fine (default: {','.join(DEFAULT_RANKS)})")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: all cores with --decode cpu, at most 4 reading bytes with gpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per worker batch (default: 64)")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images instead of failing (default: off)")
    parser.add_argument("--decode", choices=DECODES, default="cpu", help="where JPEGs are decoded: cpu (PIL workers), gpu (nvJPEG on --device, the workers only read bytes) or auto (the rule of train.py's --decode) (default: cpu)")
    parser.add_argument("--device", default="cpu", help="device for --decode gpu/auto, e.g. cuda (default: cpu)")
    parser.add_argument("--sample", type=int, default=None, metavar="N", help="measure N images drawn at random, stratified over classes, and print the standard error of the mean and std: minutes instead of hours on a million images (default: every image, exact)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample draw (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    return parser


def run(args: argparse.Namespace) -> dict:
    split = read_split(args.data, args.split, tuple(args.ranks.split(",")))
    if args.sample is not None and not 0 < args.sample:
        raise UsageError(f"--sample {args.sample}: give a number of images of at least 1")
    stats = compute_stats(split, args.size, args.workers, args.batch_size, args.skip_bad_images, progress=not args.quiet,
                          decode=args.decode, device=args.device, sample=args.sample, seed=args.seed)
    out = args.out or default_stats_path(args.data, args.split)
    write_stats(stats, out)
    print(summary(stats, out))
    return stats


@command
def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
