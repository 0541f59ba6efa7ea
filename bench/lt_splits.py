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
from typing import Sequence

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


def write_split(data: Path, source: str, name: str, most: int, fewest: int, seed: int, rest: str | None = None) -> pd.DataFrame:
    """Write ``DATA/<name>``: a long tail drawn from ``source``, or with ``rest`` the images of ``source`` it lacks."""
    metadata = read_metadata(data, source)
    labels = pd.DataFrame(metadata["annotations"])[["image_id", "category_id"]]
    kept = rest_of(labels, data, rest) if rest else choose_images(labels, most, fewest, seed)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", type=Path, help="dataset folder (Herbarium 2020 layout)")
    parser.add_argument("--source", default="train", help="split to draw from")
    parser.add_argument("--name", required=True, help="the new split's folder name")
    parser.add_argument("--max", type=int, default=70, help="images of the most frequent class")
    parser.add_argument("--min", type=int, default=1, help="images of the rarest class")
    parser.add_argument("--seed", type=int, default=1, help="draws the class order and the images")
    parser.add_argument("--rest-of", default=None, metavar="SPLIT",
                        help="instead of a long tail, the images of --source that SPLIT does not hold: a labelled split to score "
                             "runs trained on SPLIT without touching test")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kept = write_split(args.data, args.source, args.name, args.max, args.min, args.seed, rest=args.rest_of)
    counts = kept["category_id"].value_counts()
    print(f"{args.data / args.name}: {len(kept)} images, {len(counts)} classes, {counts.max()} down to {counts.min()} per class")
    return 0


if __name__ == "__main__":
    sys.exit(main())
