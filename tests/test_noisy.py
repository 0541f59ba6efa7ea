"""Noisy labels: O2U weights, their exact resume, label flipping and cross-prediction cleaning."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from herbarium import engine
from herbarium.checkpoint import load_checkpoint
from herbarium.config import DataConfig, LossConfig, O2UConfig, OptimConfig, TrainConfig
from herbarium.demo import make_demo_data
from herbarium.models.config import ModelConfig
from herbarium.noisy.cleaning import clean_labels, detection_scores, split_by_agreement
from herbarium.noisy.inject import inject_label_noise
from herbarium.noisy.o2u import O2UReweighter, loss_weights


@pytest.fixture(scope="module")
def noisy_demo(tmp_path_factory) -> Path:
    """8 species, 20% of the training labels flipped (answer key in train/flipped_labels.csv)."""
    root = tmp_path_factory.mktemp("noisy")
    make_demo_data(root / "clean", seed=0, image_size=32, max_per_class=20, min_per_class=6, test_per_class=2,
                   num_families=2, genera_per_family=2, species_per_genus=2)
    inject_label_noise(root / "clean", root / "noisy", fraction=0.2, seed=0)
    return root / "noisy"


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(
        out=str(out), epochs=2, seed=0, device="cpu", log_every=0,
        data=DataConfig(data=str(data), val_split="test", size=32, batch_size=16, workers=0),
        model=ModelConfig(pretrained=False, trunk="resnet10t", dropout=0.0),
        loss=LossConfig(levels=("species",), loss="ce", class_weights="none"),
        optim=OptimConfig(optim="adam@2e-3:0", schedule="sgdr:1"),
        o2u=O2UConfig(enabled=True),
    )
    return dataclasses.replace(cfg, **changes)


# ------------------------------------------------------------------ weights
def test_exp_and_rank_weightings_follow_their_formulas():
    losses = torch.tensor([-1.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 1.0, math.exp(-0.25), math.exp(-1.5)], dtype=torch.float64)
    assert torch.allclose(loss_weights(losses, "exp", temperature=2.0, floor=0.1), expected)
    assert float(loss_weights(losses, "exp", temperature=0.5, floor=0.1)[3]) == pytest.approx(0.1)  # exp(-6) clipped
    assert torch.allclose(loss_weights(torch.tensor([3.0, -1.0, 0.5, 0.0]), "rank", 1.0, floor=0.2),
                          torch.tensor([0.2, 1.0, 1 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="exp"):
        loss_weights(losses, "median", 1.0, 0.1)


def test_normalised_loss_is_the_cycle_mean_of_loss_minus_epoch_mean():
    o2u = O2UReweighter(3, weighting="exp", temperature=1.0, floor=0.0)
    labelled = torch.ones(3, dtype=torch.bool)
    o2u.record(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 6.0]), labelled)  # epoch mean 3
    o2u.end_epoch()
    o2u.record(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), labelled[:2])  # sample 2 unseen; mean 0.5
    o2u.record(torch.tensor([2]), torch.tensor([float("nan")]), labelled[:1])  # non-finite: skipped
    o2u.end_epoch()
    assert o2u.batch_weights(torch.tensor([0])) is None  # no cycle done yet
    summary = o2u.end_cycle()
    expected = torch.tensor([(-2.0 - 0.5) / 2, (-1.0 + 0.5) / 2, 3.0], dtype=torch.float64)
    assert torch.allclose(o2u.normalised_loss, expected)
    assert torch.allclose(o2u.weights, torch.tensor([1.0, 1.0, math.exp(-3.0)]))
    assert torch.allclose(o2u.batch_weights(torch.tensor([2, 0])), torch.tensor([math.exp(-3.0), 1.0]))
    assert summary["fraction_below_half"] == pytest.approx(1 / 3)
    restored = O2UReweighter(3)
    restored.load_state_dict(o2u.state_dict())
    assert torch.equal(restored.weights, o2u.weights) and restored.cycles_done == 1


# ------------------------------------------------------------- end to end
def test_o2u_down_weights_flipped_labels_and_resumes_exactly(noisy_demo, tmp_path):
    straight = tiny_config(noisy_demo, tmp_path / "straight")
    record = engine.train(straight)
    assert record["o2u"]["cycles_done"] == 2 and record["o2u"]["active"]
    weights = pd.read_csv(tmp_path / "straight" / "o2u_weights.csv")
    flipped = set(pd.read_csv(noisy_demo / "train" / "flipped_labels.csv")["image_id"])
    is_flipped = weights["image_id"].isin(flipped)
    assert is_flipped.sum() == len(flipped)
    assert weights.loc[is_flipped, "weight"].mean() < 0.75 * weights.loc[~is_flipped, "weight"].mean()
    assert list((tmp_path / "straight" / "tb").iterdir())
    # the state is in the checkpoint (weights_only) and a paused run ends identical
    state = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert state["o2u"]["cycles_done"] == 2
    engine.train(tiny_config(noisy_demo, tmp_path / "paused", stop_after_epoch=1))
    engine.train(tiny_config(noisy_demo, tmp_path / "paused"), resume=tmp_path / "paused")
    resumed = load_checkpoint(tmp_path / "paused" / "checkpoints" / "last.pt")
    assert torch.equal(resumed["o2u"]["weights"], state["o2u"]["weights"])
    assert all(torch.equal(resumed["model"][k], state["model"][k]) for k in state["model"])


def test_o2u_needs_an_sgdr_schedule(noisy_demo, tmp_path):
    with pytest.raises(ValueError, match="sgdr"):
        engine.Trainer(tiny_config(noisy_demo, tmp_path / "run", optim=OptimConfig(schedule="cosine")))
    with pytest.raises(ValueError, match="whole number"):
        engine.Trainer(tiny_config(noisy_demo, tmp_path / "run", optim=OptimConfig(schedule="sgdr:1.5")))


# ------------------------------------------------------------------ noise
def test_inject_label_noise_flips_the_fraction_and_keeps_the_original(noisy_demo):
    original = json.loads((noisy_demo.parent / "clean" / "train" / "metadata.json").read_text())
    noisy = json.loads((noisy_demo / "train" / "metadata.json").read_text())
    flipped = pd.read_csv(noisy_demo / "train" / "flipped_labels.csv")
    labels = {a["image_id"]: a["category_id"] for a in original["annotations"]}
    noisy_labels = {a["image_id"]: a["category_id"] for a in noisy["annotations"]}
    changed = {i for i in labels if labels[i] != noisy_labels[i]}
    assert changed == set(flipped["image_id"]) and len(changed) == round(0.2 * len(labels))
    assert all(labels[row.image_id] == row.category_id and noisy_labels[row.image_id] == row.noisy_category_id
               for row in flipped.itertuples())
    image = next(iter(original["images"]))["file_name"]
    assert (noisy_demo / "train" / image).samefile(noisy_demo.parent / "clean" / "train" / image)  # linked, not copied


# --------------------------------------------------------------- cleaning
def test_split_by_agreement_keeps_the_best_agreeing_per_class_and_flags_the_rest():
    oof = pd.DataFrame({
        "image_id": [1, 2, 3, 4, 5, 6],
        "label": [10, 10, 10, 20, 20, 30],
        "predicted": [10, 10, 20, 20, 10, 10],
        "probability": [0.9, 0.6, 0.7, 0.8, 0.95, 0.5],
        "label_probability": [0.9, 0.6, 0.2, 0.8, 0.01, 0.3],
        "label_name": "x", "predicted_name": "y",
    })
    folds = pd.DataFrame({"image_id": ["7"], "category_id": [40], "fold": [-1]})
    kept, flagged = split_by_agreement(oof, keep_per_class=1, folds=folds)
    assert flagged["image_id"].tolist() == [5, 3, 6]  # disagreements, most confident first
    assert kept["image_id"].astype(str).tolist() == ["1", "4", "6", "7"]
    assert kept["kept_because"].tolist() == ["agrees", "agrees", "class_cover", "too_few_to_check"]
    all_kept, _ = split_by_agreement(oof, keep_per_class=0)
    assert sorted(all_kept.loc[all_kept["kept_because"] == "agrees", "image_id"]) == [1, 2, 4]
    assert detection_scores([5, 3, 6], [5, 6, 9, 10]) == {"flagged": 3, "noisy": 4, "found": 2, "precision": 2 / 3, "recall": 0.5}


def test_cross_prediction_finds_most_flipped_labels(noisy_demo, tmp_path):
    cfg = tiny_config(noisy_demo, tmp_path / "clean", epochs=3,
                      optim=OptimConfig(optim="adam@2e-3:0", schedule="cosine"), o2u=O2UConfig())
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_split=None))
    result = clean_labels(cfg, folds=2, keep_per_class=3)
    flipped = pd.read_csv(noisy_demo / "train" / "flipped_labels.csv")["image_id"]
    scores = detection_scores(result["flagged_ids"], flipped)
    assert scores["recall"] >= 0.6, scores
    assert scores["precision"] > 0.25, scores  # flagging at random would give 0.2 (the noise rate)
    kept = pd.read_csv(tmp_path / "clean" / "kept.csv")
    assert kept.groupby("label").size().max() <= 3
    assert set(kept["label"]) == set(pd.read_csv(tmp_path / "clean" / "folds.csv")["category_id"])  # every class stays
    folds = pd.read_csv(tmp_path / "clean" / "folds.csv")
    assert set(folds["fold"]) <= {-1, 0, 1}
    oof = pd.read_csv(tmp_path / "clean" / "oof_predictions.csv")
    assert len(oof) == (folds["fold"] >= 0).sum()
