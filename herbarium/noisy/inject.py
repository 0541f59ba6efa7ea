"""Flip a fraction of a split's labels, to measure how well noise is found and tolerated.

``herbarium inject-label-noise DATA OUT --fraction 0.2`` writes ``OUT``, a
copy of ``DATA`` in which a random ``fraction`` of the training
annotations name another category, drawn uniformly among the others
("symmetric" noise). Images are hard links, so the copy is small and lies
inside OUT (symbolic links out of a dataset are refused when read, see
:mod:`herbarium.data.confine`); across file systems they are copied.
``OUT/<split>/flipped_labels.csv`` lists what was changed (image_id,
category_id = the true one, noisy_category_id) and serves as the answer key
(``clean-labels --known-noise``). Works on the COCO-style layouts
(``DATA/<split>/metadata.json`` with ``annotations``: Herbarium 2020/2021
and the demo data).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from herbarium.arguments import ArgumentParser
from herbarium.data.readers import read_json
from herbarium.errors import command

FLIPPED_FILE = "flipped_labels.csv"


def inject_label_noise(data: str | Path, out: str | Path, fraction: float, seed: int = 0, split: str = "train") -> pd.DataFrame:
    """Write ``out`` with ``fraction`` of ``split``'s labels flipped; returns the flipped rows."""
    data, out = Path(data), Path(out)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the noise fraction must be in (0, 1), got {fraction}")
    metadata_path = data / split / "metadata.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{metadata_path} not found: only COCO-style layouts (DATA/<split>/metadata.json) are supported")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    metadata = read_json(metadata_path)
    annotations = metadata.get("annotations") or []
    if not annotations:
        raise ValueError(f"{metadata_path} has no annotations to flip")
    category_ids = sorted({category["id"] for category in metadata["categories"]}, key=str)
    if len(category_ids) < 2:
        raise ValueError("flipping labels needs at least two categories")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(annotations), size=max(1, round(fraction * len(annotations))), replace=False)
    rows = []
    for index in sorted(chosen.tolist()):
        annotation = annotations[index]
        others = [c for c in category_ids if c != annotation["category_id"]]
        noisy = others[int(rng.integers(len(others)))]
        rows.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"], "noisy_category_id": noisy})
        annotation["category_id"] = noisy
    out.mkdir(parents=True, exist_ok=True)
    for entry in data.iterdir():
        if entry.name != split:
            _link_tree(entry, out / entry.name)
    (out / split).mkdir()
    for entry in (data / split).iterdir():
        if entry.name not in ("metadata.json", FLIPPED_FILE):
            _link_tree(entry, out / split / entry.name)
    (out / split / "metadata.json").write_text(json.dumps(metadata))
    flipped = pd.DataFrame(rows, columns=["image_id", "category_id", "noisy_category_id"])
    flipped.to_csv(out / split / FLIPPED_FILE, index=False)
    return flipped


def _link_tree(source: Path, target: Path) -> None:
    """``source`` (a file or a folder) at ``target`` as hard links; copied where a hard link cannot be made."""
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="herbarium inject-label-noise", description="Copy a dataset (images linked) with a fraction "
                                     "of one split's labels flipped to another category; the changes go to <split>/flipped_labels.csv.")
    parser.add_argument("data", help="dataset folder (DATA/<split>/metadata.json layout)")
    parser.add_argument("out", help="folder to write; must be empty or absent")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the labels to flip (default: 0.2)")
    parser.add_argument("--split", default="train", help="split whose labels are flipped (default: train)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    flipped = inject_label_noise(args.data, args.out, args.fraction, args.seed, args.split)
    print(f"wrote {args.out}: {len(flipped)} {args.split} labels flipped; answer key {Path(args.out) / args.split / FLIPPED_FILE}")
    return 0
