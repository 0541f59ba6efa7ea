"""Tests for herbarium/config.py: TrainConfig survives a trip through config.json."""

from __future__ import annotations

import dataclasses
import json

import pytest

from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from herbarium.errors import ConfigError
from herbarium.models.config import ModelConfig


def _custom() -> TrainConfig:
    return TrainConfig(
        out="runs/h2021", epochs=3, seed=7, stop_after_epoch=2,
        data=DataConfig(data="/data/h2021", val_split="val", ranks=("order", "family", "genus", "species"),
                        stats="/data/stats.json", size=320, workers=None, sampler="sqrt", skip_bad_images=True),
        model=ModelConfig(pretrained=False, trunk="resnet50", dropout=0.2, embedding_dim=512, pool="gem"),
        loss=LossConfig(levels=("species", "genus"), level_weights={"species": 2.0, "genus": 0.5},
                        loss="species=focal,genus=ce", gamma=1.5),
        optim=OptimConfig(optim="adam:0,sgd@0.01:10", clip_grad=5.0, weight_decay=None),
    )


def test_round_trip_through_a_file(tmp_path):
    for config in (TrainConfig(), _custom()):
        path = tmp_path / "config.json"
        config.save(path)
        loaded = TrainConfig.load(path)
        assert loaded == config
        assert isinstance(loaded.data.ranks, tuple) and isinstance(loaded.loss.levels, tuple)
        assert isinstance(loaded.model, ModelConfig)


def test_file_is_plain_json():
    data = json.loads(json.dumps(_custom().to_dict()))
    assert data["data"]["ranks"] == ["order", "family", "genus", "species"]
    assert data["loss"]["level_weights"] == {"species": 2.0, "genus": 0.5}
    assert data["model"]["embedding_dim"] == 512
    assert data["optim"]["weight_decay"] is None
    assert data["seed"] == 7


def test_missing_keys_default_and_unknown_ones_are_refused():
    data = _custom().to_dict()
    del data["loss"]["gamma"]
    loaded = TrainConfig.from_dict(data)
    assert loaded.loss.gamma == LossConfig().gamma
    assert dataclasses.replace(loaded, loss=_custom().loss) == _custom()
    for where, key in ((data, "from_a_newer_version"), (data["data"], "another_new_field")):
        where[key] = 1
        with pytest.raises(ConfigError, match=f"unknown setting '(data\\.)?{key}'"):
            TrainConfig.from_dict(data)
        del where[key]


def test_loss_by_rank_and_weights():
    loss = _custom().loss
    assert loss.loss_by_rank() == {"species": "focal", "genus": "ce"}
    assert loss.weight_of("genus") == 0.5 and loss.weight_of("family") == 1.0
    assert LossConfig().loss_by_rank() == {"species": "logit_adjusted", "genus": "logit_adjusted", "family": "logit_adjusted"}


def test_loss_by_rank_refuses_unknown_and_missing_ranks():
    with pytest.raises(ValueError, match=r"\['order'\] that are not in --levels"):
        LossConfig(levels=("species",), loss="species=ce,order=ce").loss_by_rank()
    with pytest.raises(ValueError, match=r"no loss for rank\(s\) \['genus'\]"):
        LossConfig(levels=("species", "genus"), loss="species=ce").loss_by_rank()
