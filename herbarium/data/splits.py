"""Holding out part of a training split for validation, stratified by class."""

from __future__ import annotations

import dataclasses

import numpy as np

from herbarium.data.readers import DatasetSplit


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
    by_class: dict = {}
    for index, sample in enumerate(split.samples):
        by_class.setdefault(sample.category_id, []).append(index)
    val_indices = []
    for category_id in sorted(by_class, key=str):
        members = np.array(by_class[category_id])
        take = min(int(round(fraction * len(members))), len(members) - 1)
        if take > 0:
            val_indices.extend(rng.choice(members, size=take, replace=False).tolist())
    held = set(val_indices)
    train = [s for i, s in enumerate(split.samples) if i not in held]
    val = [split.samples[i] for i in sorted(held)]
    if not val:
        raise ValueError(f"holding out {fraction} of {len(split)} images leaves no validation image (a class's last image "
                         "stays in training); pass a larger --holdout, --val-split SPLIT, or --holdout 0 to train without validation")
    return (dataclasses.replace(split, samples=train), dataclasses.replace(split, name=f"{split.name}-holdout", samples=val))
