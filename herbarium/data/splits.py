"""Which images a run trains and validates on: named splits, listed ids, a stratified hold-out, a subset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from herbarium.config import TrainConfig
from herbarium.data.index_cache import read_split_indexed
from herbarium.data.readers import DatasetSplit, read_csv_table, read_split
from herbarium.data.sample_table import category_keys, image_id_texts, take_samples


def stratified_holdout(split: DatasetSplit, fraction: float, seed: int = 0) -> tuple[DatasetSplit, DatasetSplit]:
    """Split ``split`` into (train, val) keeping each class's share.

    Each class gives ``round(fraction * n)`` images to validation, but never
    its last one: in a long tail, a class with a single image must stay in
    training or the model can never learn it. The choice is a pure function
    of ``seed``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--holdout must be a fraction in (0, 1), got {fraction}; --holdout 0 trains without validation, "
                         "--val-split SPLIT validates on another split")
    rng = np.random.default_rng(seed)
    keys = category_keys(split.samples)
    by_class = np.argsort(keys, kind="stable")  # classes in text order, each class's images in split order
    starts = np.flatnonzero(np.r_[True, keys[by_class][1:] != keys[by_class][:-1]])
    held = np.zeros(len(keys), dtype=bool)
    for members in np.split(by_class, starts[1:]):
        take = min(int(round(fraction * len(members))), len(members) - 1)
        if take > 0:
            held[rng.choice(members, size=take, replace=False)] = True
    train = take_samples(split.samples, np.flatnonzero(~held))
    val = take_samples(split.samples, np.flatnonzero(held))
    if not len(val):
        raise ValueError(f"holding out {fraction} of {len(split)} images leaves no validation image (a class's last image "
                         "stays in training); pass a larger --holdout, --val-split SPLIT, or --holdout 0 to train without validation")
    return (dataclasses.replace(split, samples=train), dataclasses.replace(split, name=f"{split.name}-holdout", samples=val))


def read_image_ids(path: str | Path) -> set[str]:
    """The ``image_id`` column of a CSV (kept.csv, a fold's ids, ...), as strings."""
    frame = read_csv_table(Path(path), dtype=str, keep_default_na=False)
    if "image_id" not in frame.columns:
        raise ValueError(f"{path}: needs an image_id column; it has {list(frame.columns)}")
    return set(frame["image_id"])


def select_images(split: DatasetSplit, ids: set[str], source: str | Path, name: str | None = None) -> DatasetSplit:
    """The samples of ``split`` whose image ids are in ``ids``; every id must be in the split."""
    present = image_id_texts(split.samples)
    wanted = np.asarray(sorted(ids), dtype=np.str_)
    unknown = wanted[~np.isin(wanted, present)].tolist()
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} image id(s) are not in split {split.name!r}, e.g. {unknown[:3]}")
    samples = take_samples(split.samples, np.flatnonzero(np.isin(present, wanted)))
    return dataclasses.replace(split, samples=samples, name=name or split.name)


def read_train_val(cfg: TrainConfig) -> tuple[DatasetSplit, DatasetSplit | None]:
    """The training split and its validation split (named, listed by ``holdout_ids``, held out of train, or None).

    With no validation split named and ``holdout`` 0 (the default) there is
    none: every training image trains, and the last epoch is the run's
    checkpoint. On a long tail a 10% hold-out costs the rare classes images
    they cannot spare, and with a cosine schedule the last epoch is the one
    a selection would pick anyway.

    ``data.subset`` then keeps only the listed training images (the
    validation split is not filtered), which is how k-fold, cleaning and
    fine-tuning on a clean subset train on part of a split.
    """
    data = cfg.data
    train = read_split_indexed(data.data, data.train_split, data.ranks)
    subset = None
    if data.subset:
        subset = read_image_ids(data.subset)
        select_images(train, subset, data.subset)  # every listed id must be an image of the split
    if data.holdout_ids and data.val_split:
        raise ValueError("holdout_ids and val_split both name the validation images; give one")
    if data.val_split:
        val = read_split(data.data, data.val_split, data.ranks, taxonomy=train.taxonomy)
    elif data.holdout_ids:
        held = read_image_ids(data.holdout_ids)
        val = select_images(train, held, data.holdout_ids, name=f"{train.name}-holdout")
        train = select_images(train, set(image_id_texts(train.samples).tolist()) - held, data.holdout_ids)
    elif data.holdout > 0:
        train, val = stratified_holdout(train, data.holdout, cfg.seed)
    else:
        val = None
    if subset is not None:
        train = select_images(train, subset & set(image_id_texts(train.samples).tolist()), data.subset)
        if not len(train.samples):
            raise ValueError(f"{data.subset}: none of its image ids is a training image")
    return train, val


def stratified_sample(split: DatasetSplit, size: int, seed: int = 0) -> np.ndarray:
    """Positions of ``size`` images of ``split`` drawn at random, each class's share of them as its share of the split.

    Classes get ``size * n_c / N`` images rounded down, and the images left
    go to the classes with the largest remainders (ties drawn at random); so
    the sample's class mix is the split's, and a mean over it estimates the
    split's mean without a reweighting. Sorted; a pure function of ``seed``.
    """
    total = len(split)
    if not 0 < size <= total:
        raise ValueError(f"--sample {size}: must be between 1 and the {total:,} images of split {split.name!r}")
    rng = np.random.default_rng(seed)
    _, classes, counts = np.unique(category_keys(split.samples), return_inverse=True, return_counts=True)
    exact = size * counts / total
    quota = np.floor(exact).astype(np.int64)
    largest_remainders = np.lexsort((rng.random(len(counts)), quota - exact))
    quota[largest_remainders[:size - quota.sum()]] += 1
    grouped = np.lexsort((rng.random(total), classes))  # images by class, in random order within each
    rank_in_class = np.empty(total, dtype=np.int64)
    rank_in_class[grouped] = np.arange(total) - np.r_[0, np.cumsum(counts)[:-1]][classes[grouped]]
    return np.flatnonzero(rank_in_class < quota[classes])
