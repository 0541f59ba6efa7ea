"""``herbarium predict RUN IMAGES... --out predictions.csv``: a trained run on your own image files.

IMAGES are files, folders (searched recursively for image files) or glob
patterns (``"photos/**/*.jpg"``, quoted so the shell leaves it alone). No
metadata is needed. One CSV row per readable file: its path, the
consistent taxonomy path (a name per rank, its probability and the finest
class's category id), then the top-k names and probabilities of each head.
Built on :mod:`herbarium.api`.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from herbarium.api import load
from herbarium.arguments import ArgumentParser
from herbarium.evaluation.submission import write_atomic
from herbarium.errors import command
from herbarium.runtime import default_workers
from herbarium.terminal import show_progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def folder_images(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted, hidden files and folders left out (``.ipynb_checkpoints`` holds
    copies of the notebook's images, ``.git`` and ``._name`` macOS forks are no images to predict); hidden folders
    are not even entered."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(root, name) for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def expand_images(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (recursively, image suffixes only, hidden ones skipped) and glob patterns -> image files, each
    once, in order.

    Raises ``FileNotFoundError`` naming an input that is neither an existing
    file or folder nor a pattern that matches a file.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = folder_images(path)
            if not matches:
                raise FileNotFoundError(f"{item}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"{item}: no such file or folder, and no file matches it as a glob pattern")
        found += matches
    return list(dict.fromkeys(found))


def prediction_rows(predictions, taxonomy_ranks: Sequence[str], head_ranks: Sequence[str], topk: int) -> tuple[list[str], list[list]]:
    """CSV header and rows for :class:`herbarium.api.Prediction` objects."""
    header = ["path", *(f"consistent_{rank}" for rank in taxonomy_ranks), "consistent_prob", "category_id"]
    header += [f"{rank}_top{i}{suffix}" for rank in head_ranks for i in range(1, topk + 1) for suffix in ("", "_prob")]
    rows = []
    for p in predictions:
        row = [p.path, *(p.consistent[rank] for rank in taxonomy_ranks), f"{p.consistent_probability:.6f}", p.category_id]
        for rank in head_ranks:
            top = p.top[rank] + [("", None)] * (topk - len(p.top[rank]))  # a rank with fewer classes than k
            row += [value for name, probability in top for value in (name, "" if probability is None else f"{probability:.6f}")]
        rows.append(row)
    return header, rows


def write_prediction_csv(path: str | Path, predictions, taxonomy_ranks: Sequence[str], head_ranks: Sequence[str], topk: int) -> Path:
    header, rows = prediction_rows(predictions, taxonomy_ranks, head_ranks, topk)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_atomic(path, buffer.getvalue())


def build_parser(prog: str = "herbarium predict") -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description="Predict the classes of image files with a trained run: "
                                     "one CSV row per file with the consistent taxonomy path and each head's top-k.")
    parser.add_argument("run", help="run directory (checkpoints/last.pt, else best.pt; best.pt first for an --early-stop run) or a checkpoint file")
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or quoted glob patterns")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    parser.add_argument("--topk", type=int, default=5, help="names kept per rank (default: 5)")
    parser.add_argument("--views", default="plain", help="TTA views as tta_eval.py takes them, e.g. plain, flip, 4, multiscale (default: plain)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable files and count them instead of stopping (default: off)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="autocast precision (default: auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")
    files = expand_images(args.images)  # an input that names no file: one line (see herbarium.errors)
    run = load(args.run, device=args.device, precision=args.precision)
    workers = default_workers() if args.workers is None else args.workers
    progress = None if not show_progress(args.quiet) else (lambda batches: tqdm(batches, desc="predict", unit="batch", leave=False, dynamic_ncols=True,
                                                             total=-(-len(files) // args.batch_size)))
    predictions = run.predict(files, topk=args.topk, views=args.views, batch_size=args.batch_size, workers=workers,
                              skip_bad_images=args.skip_bad_images, progress=progress)
    out = write_prediction_csv(args.out, predictions, run.taxonomy.ranks, run.ranks, args.topk)
    skipped = len(files) - len(predictions)
    print(f"{len(predictions)} images -> {out}" + (f" ({skipped} unreadable files skipped)" if skipped else ""),
          file=sys.stdout)
    return 0
