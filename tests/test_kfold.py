"""k-fold splits (stratified, disjoint, covering) and the engine's subset / holdout-ids hooks."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from herbarium.config import DataConfig, TrainConfig
from herbarium.demo import make_demo_data
from herbarium.data.splits import read_train_val
from herbarium.kfold import UNFOLDED, fold_assignments, main as kfold_main, write_ids


def test_folds_are_disjoint_cover_the_data_and_are_stratified():
    labels = [c for c, n in {"a": 10, "b": 7, "c": 5, "d": 3, "e": 1} .items() for _ in range(n)]
    folds = fold_assignments(labels, folds=5, seed=0)
    assert len(folds) == len(labels)  # one fold per sample: disjoint by construction
    small = {"d", "e"}  # fewer images than folds: always trained on
    assert all((f == UNFOLDED) == (label in small) for f, label in zip(folds, labels))
    assert set(folds[folds != UNFOLDED]) == set(range(5))  # every foldable sample is in exactly one of the 5 folds
    for label in ("a", "b", "c"):
        per_fold = Counter(int(f) for f, l in zip(folds, labels) if l == label)
        assert set(per_fold) == set(range(5)) and max(per_fold.values()) - min(per_fold.values()) <= 1, (label, per_fold)
    assert np.array_equal(folds, fold_assignments(labels, folds=5, seed=0))
    assert not np.array_equal(folds, fold_assignments(labels, folds=5, seed=1))


def test_bad_folds_fail_clearly():
    with pytest.raises(ValueError, match="at least 2"):
        fold_assignments(["a", "a"], folds=1)
    with pytest.raises(ValueError, match="fewer folds"):
        fold_assignments(["a", "b"], folds=2)
    with pytest.raises(ValueError, match="label"):
        fold_assignments(["a", None, "a"], folds=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kfold") / "demo"
    make_demo_data(out, seed=0, image_size=16, max_per_class=6, min_per_class=2, test_per_class=1)
    return out


def test_holdout_ids_and_subset_select_the_training_and_validation_images(demo, tmp_path):
    cfg = TrainConfig(data=DataConfig(data=str(demo)))
    full, _ = read_train_val(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout=0.5)))
    everything = full.samples + _.samples
    ids = [str(s.image_id) for s in everything]
    held = write_ids(tmp_path / "held.csv", ids[:10])
    subset = write_ids(tmp_path / "subset.csv", ids[5:30])
    train, val = read_train_val(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout_ids=str(held), subset=str(subset))))
    assert {str(s.image_id) for s in val.samples} == set(ids[:10])
    assert {str(s.image_id) for s in train.samples} == set(ids[10:30])
    bad = write_ids(tmp_path / "bad.csv", ["no-such-image"])
    with pytest.raises(ValueError, match="not in split"):
        read_train_val(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, subset=str(bad))))
    with pytest.raises(ValueError, match="give one"):
        read_train_val(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout_ids=str(held), val_split="test")))


def test_kfold_refuses_a_validation_split(demo, tmp_path, capsys):
    assert kfold_main([str(demo), "--folds", "2", "--val-split", "test", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "held-out fold" in capsys.readouterr().err
