#!/usr/bin/env python
"""More long-tailed training splits of one dataset, for choosing defaults that hold on more than one draw.

    python bench/lt_splits.py DATA --source train --name train_lt_s1 --max 70 --min 1 --seed 1
    python bench/lt_splits.py DATA --source train --name train_lt_r20 --max 40 --min 2 --seed 2
    python bench/lt_splits.py DATA --source train --name train_rest --rest-of train_lt

Writes ``DATA/<name>/`` in the source split's layout (Herbarium 2020
``metadata.json`` with every category, ``labels.csv``, images hard-linked,
or copied across file systems): the finest classes, in an order drawn from
the seed, keep an exponentially falling number of images from ``--max``
down to ``--min`` (capped at what the class has), the images drawn from the
seed too. A new order puts other classes in the tail; a new ratio changes
how steep the tail is. Validation and test splits are untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from herbarium.data.readers import read_json


def tail_counts(num_classes: int, most: int, fewest: int) -> np.ndarray:
    """Images per class from ``most`` down to ``fewest`` on an exponential profile, rounded (the rank order)."""
    ratio = fewest / most
    return np.maximum(fewest, np.round(most * ratio ** (np.arange(num_classes) / max(1, num_classes - 1)))).astype(int)


def choose_images(labels: pd.DataFrame, most: int, fewest: int, seed: int) -> pd.DataFrame:
    """The rows of ``labels`` (image_id, category_id) that the long-tailed split keeps."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.sort(labels["category_id"].unique()))
    wanted = dict(zip(classes, tail_counts(len(classes), most, fewest)))
    shuffled = labels.sample(frac=1.0, random_state=seed)
    rank_in_class = shuffled.groupby("category_id").cumcount()
    keep = rank_in_class < shuffled["category_id"].map(wanted)
    return shuffled[keep].sort_values("image_id")


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def read_metadata(data: Path, split: str) -> dict:
    return read_json(data / split / "metadata.json")  # the library's reader: Herbarium 2020's train file is latin-1


def rest_of(labels: pd.DataFrame, data: Path, other: str) -> pd.DataFrame:
    """The rows of ``labels`` whose images split ``other`` does not hold: labelled images no run on ``other`` saw."""
    taken = {annotation["image_id"] for annotation in read_metadata(data, other)["annotations"]}
    return labels[~labels["image_id"].isin(taken)]


def write_split(data: Path, source: str, name: str, select: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """Write ``DATA/<name>``: the images of ``source`` whose label rows ``select`` keeps (image_id, category_id)."""
    metadata = read_metadata(data, source)
    labels = pd.DataFrame(metadata["annotations"])[["image_id", "category_id"]]
    kept = select(labels)
    ids = set(kept["image_id"])
    out = data / name
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --name")
    images = [image for image in metadata["images"] if image["id"] in ids]
    for image in images:
        link_or_copy(data / source / image["file_name"], out / image["file_name"])
    subset = {**metadata, "images": images, "annotations": [a for a in metadata["annotations"] if a["image_id"] in ids]}
    (out / "metadata.json").write_text(json.dumps(subset), encoding="utf-8")
    kept.to_csv(out / "labels.csv", index=False)
    return kept


TAIL_DEFAULTS = {"max": 70, "min": 1, "seed": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="dataset folder (Herbarium 2020 layout)")
    parser.add_argument("--source", default="train", help="split to draw from (default: train)")
    parser.add_argument("--name", required=True, help="the new split's folder name")
    parser.add_argument("--max", type=int, help=f"images of the most frequent class (default: {TAIL_DEFAULTS['max']})")
    parser.add_argument("--min", type=int, help=f"images of the rarest class (default: {TAIL_DEFAULTS['min']})")
    parser.add_argument("--seed", type=int, help=f"draws the class order and the images (default: {TAIL_DEFAULTS['seed']})")
    parser.add_argument("--rest-of", default=None, metavar="SPLIT",
                        help="instead of a long tail, the images of --source that SPLIT does not hold: a labelled split to score "
                             "runs trained on SPLIT without touching test; takes no --max, --min or --seed")
    return parser


def selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """What the new split keeps: the rest of ``--rest-of``, or a long tail shaped by ``--max``/``--min``/``--seed``.

    The tail's options mean nothing to ``--rest-of``; given together they are refused rather than silently ignored.
    """
    tail_given = [f"--{key}" for key in TAIL_DEFAULTS if getattr(args, key) is not None]
    if args.rest_of:
        if tail_given:
            parser.error(f"--rest-of takes every image of --source that {args.rest_of} lacks; {', '.join(tail_given)} would be ignored")
        return lambda labels: rest_of(labels, args.data, args.rest_of)
    tail = {key: default if getattr(args, key) is None else getattr(args, key) for key, default in TAIL_DEFAULTS.items()}
    return lambda labels: choose_images(labels, tail["max"], tail["min"], tail["seed"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    kept = write_split(args.data, args.source, args.name, selection(parser, args))
    counts = kept["category_id"].value_counts()
    print(f"{args.data / args.name}: {len(kept)} images, {len(counts)} classes, {counts.max()} down to {counts.min()} per class")
    return 0


if __name__ == "__main__":
    sys.exit(main())
