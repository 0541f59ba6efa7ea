"""``prepare``: a copy of a dataset with smaller images, for a faster CPU input path.

Herbarium sheets are about 1000 px on the long side; a model trained at
224 px throws most of those pixels away, after the CPU paid to decode them.
``prepare DATA --max-side 512 --out OUT`` writes the same dataset with every
image's longer side at most ``--max-side``:

* every file that is not an image (metadata JSON, CSV manifests, label
  files, READMEs) is copied byte for byte, so ids, labels and relative paths
  are unchanged and every reader (Herbarium 2020/2021, 2022, CSV) reads OUT
  as it reads DATA;
* every image is written at the same relative path and in the same format,
  shrunk with Pillow (JPEG draft decoding, Lanczos resampling), JPEGs at
  ``--quality``; an image already small enough is copied unchanged once it
  has been checked to decode.

Images are processed in parallel on every core. An unreadable image stops
the run naming the file, or with ``--skip-bad-images`` is left out of OUT and
counted (training with ``--skip-bad-images`` then skips it as missing).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from herbarium.arguments import ArgumentParser
from herbarium.data.images import IMAGE_ERRORS, BadImageError, upright
from herbarium.errors import command
from herbarium.runtime import default_workers
from herbarium.terminal import show_progress

# Suffixes of the image files to rewrite (lower case); everything else is copied.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
JPEG_QUALITY = 90


@dataclass(frozen=True)
class PrepareTask:
    source: Path
    target: Path
    max_side: int
    quality: int


@dataclass(frozen=True)
class PrepareResult:
    target: Path
    status: str  # "resized", "copied" (already small enough) or "bad"
    error: str = ""


def shrunk_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``max_side``, aspect kept; unchanged if already within."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(task: PrepareTask) -> PrepareResult:
    """Write one image at ``task.target``: shrunk if its longer side exceeds ``max_side``, else copied."""
    try:
        with Image.open(task.source) as image:
            size = shrunk_size(image.width, image.height, task.max_side)
            if size == image.size:
                image.load()  # an unreadable file must not be copied as if it were fine
                task.target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(task.source, task.target)
                return PrepareResult(task.target, "copied")
            image_format = image.format
            if image_format == "JPEG":
                image.draft(image.mode, size)  # decode at 1/2, 1/4, 1/8 scale where that stays above `size`
            resized = upright(image.resize(size, Image.Resampling.LANCZOS))  # the saved copy keeps no EXIF orientation
    except IMAGE_ERRORS as error:
        return PrepareResult(task.target, "bad", str(error))
    task.target.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": task.quality} if image_format == "JPEG" else {}
    resized.save(task.target, format=image_format, **options)
    return PrepareResult(task.target, "resized")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(data: Path, out: Path, overwrite: bool) -> None:
    """Refuse an OUT that overlaps DATA, or a non-empty one without ``overwrite``."""
    data, out = data.resolve(), out.resolve()
    if _is_within(out, data) or _is_within(data, out):
        raise ValueError(f"--out {out} must lie outside the dataset {data}, and not contain it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its contents, or choose another --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")


def dataset_files(data: Path) -> Iterator[Path]:
    """Every file under ``data``, in a stable order."""
    for folder, folders, files in os.walk(data):
        folders.sort()
        for name in sorted(files):
            yield Path(folder) / name


def prepare(data: str | Path, out: str | Path, max_side: int = 512, *, quality: int = JPEG_QUALITY,
            workers: int | None = None, skip_bad_images: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Write the resized copy of ``data`` under ``out``; returns what was done (counts, seconds)."""
    data, out = Path(data), Path(out)
    if max_side < 1:
        raise ValueError(f"--max-side must be at least 1, got {max_side}")
    if not data.is_dir():
        raise FileNotFoundError(f"no dataset folder at {data}")
    check_out(data, out, overwrite)
    if out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    workers = default_workers() if workers is None else workers
    started = time.perf_counter()

    tasks, copied_files = [], 0
    for source in dataset_files(data):
        target = out / source.relative_to(data)
        if source.suffix.lower() in IMAGE_SUFFIXES:
            tasks.append(PrepareTask(source, target, max_side, quality))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied_files += 1

    counts = {"resized": 0, "copied": 0, "bad": 0}
    bad: list[str] = []
    pool = multiprocessing.Pool(workers) if workers > 0 else contextlib.nullcontext()
    with pool, tqdm(total=len(tasks), unit="img", desc="prepare", disable=not show_progress(not progress)) as bar:
        results = pool.imap_unordered(prepare_image, tasks, chunksize=16) if workers > 0 else map(prepare_image, tasks)
        for result in results:
            counts[result.status] += 1
            bar.update(1)
            if result.status == "bad":
                source = data / result.target.relative_to(out)
                if not skip_bad_images:
                    raise BadImageError(f"cannot read image {source}: {result.error} "
                                        "(pass --skip-bad-images to skip and count such files)")
                bad.append(str(source))
    seconds = time.perf_counter() - started
    return {
        "data": str(data), "out": str(out), "max_side": max_side, "quality": quality, "workers": workers,
        "images_resized": counts["resized"], "images_copied": counts["copied"], "skipped_bad_images": counts["bad"],
        "bad_images": bad, "other_files_copied": copied_files, "seconds": seconds,
        "images_per_s": len(tasks) / seconds if seconds > 0 else None,
    }


def summary(record: dict) -> str:
    lines = [
        f"{record['images_resized']} images resized to a longer side of at most {record['max_side']} px, "
        f"{record['images_copied']} already small enough copied, {record['other_files_copied']} other files copied",
        f"{record['images_per_s']:.0f} images/s with {record['workers']} workers ({record['seconds']:.1f} s)"
        if record["images_per_s"] else f"{record['seconds']:.1f} s",
    ]
    if record["skipped_bad_images"]:
        lines.append(f"skipped {record['skipped_bad_images']} unreadable images: {', '.join(record['bad_images'][:5])}"
                     + (" ..." if record["skipped_bad_images"] > 5 else ""))
    lines.append(f"written to {record['out']}")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or ArgumentParser(prog="herbarium prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="dataset folder, any supported layout")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the resized copy to (required)")
    parser.add_argument("--max-side", type=int, default=512, help="longest image side in OUT, in pixels (default: 512)")
    parser.add_argument("--quality", type=int, default=JPEG_QUALITY, help=f"JPEG quality of resized images (default: {JPEG_QUALITY})")
    parser.add_argument("--workers", type=int, default=None, help="processes resizing images; 0: in-process (default: all cores)")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images instead of failing (default: off)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT (default: off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = prepare(args.data, args.out, args.max_side, quality=args.quality, workers=args.workers,
                     skip_bad_images=args.skip_bad_images, overwrite=args.overwrite, progress=not args.quiet)
    print(summary(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
