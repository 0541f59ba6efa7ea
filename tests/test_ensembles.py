"""Snapshots at SGDR cycle ends, SWA, and the class-based weighted ensemble."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

from herbarium import engine
from herbarium.checkpoint import load_checkpoint
from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from herbarium.demo import make_demo_data
from herbarium.evaluation.combine import class_weights_from_accuracy, per_class_accuracy
from herbarium.run_dir import RunDir
from herbarium.swa import average_state_dicts, bn_loader, main as swa_main
from herbarium.evaluation.combine import class_weighted_ensemble, ensemble
from herbarium.evaluation.runner import evaluate, load_run
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.models.config import ModelConfig


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory) -> tuple[Path, Path]:
    """Two epochs of one-epoch SGDR cycles with --snapshots."""
    root = tmp_path_factory.mktemp("ensembles")
    data = root / "demo"
    make_demo_data(data, seed=1, image_size=32, max_per_class=10, min_per_class=2, test_per_class=2)
    cfg = TrainConfig(
        out=str(root / "run"), epochs=2, seed=0, device="cpu", snapshots=True,
        data=DataConfig(data=str(data), val_split="test", size=32, batch_size=16, workers=0),
        model=ModelConfig(pretrained=False, trunk="resnet10t", dropout=0.0, embedding_dim=16),
        loss=LossConfig(levels=("genus", "species")),
        optim=OptimConfig(optim="adam@2e-3:0", schedule="sgdr:1"),
    )
    engine.train(cfg)
    return data, Path(cfg.out)


def settings(**changes) -> EvaluationSettings:
    return EvaluationSettings(**{"views": ("plain",), "workers": 0, "device": "cpu", "batch_size": 16, **changes})


# ---------------------------------------------------------------- snapshots
def test_a_snapshot_is_saved_at_the_end_of_every_cycle(snapshot_run):
    _, run = snapshot_run
    first = load_checkpoint(run / "checkpoints" / "snapshot_1.pt")
    second = load_checkpoint(run / "checkpoints" / "snapshot_2.pt")
    assert (first["run"]["epoch"], second["run"]["epoch"]) == (1, 2)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(torch.equal(second["model"][k], last["model"][k]) for k in last["model"])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r.get("snapshot") for r in records] == ["snapshot_1", "snapshot_2"]


def test_snapshots_need_sgdr(snapshot_run, tmp_path):
    data, run = snapshot_run
    cfg = TrainConfig.load(run / "config.json")
    cfg.out, cfg.optim = str(tmp_path / "x"), OptimConfig(schedule="step:5")
    with pytest.raises(ValueError, match="sgdr"):
        engine.Trainer(cfg)


# ---------------------------------------------------------------------- SWA
def test_average_of_identical_states_is_the_state_and_of_two_is_their_mean():
    a = {"w": torch.randn(3, 4), "n": torch.tensor(5)}
    b = {"w": torch.randn(3, 4), "n": torch.tensor(9)}
    same = average_state_dicts([a, copy.deepcopy(a), copy.deepcopy(a)])
    assert torch.equal(same["w"], a["w"]) and torch.equal(same["n"], a["n"])
    mean = average_state_dicts([a, b])
    assert torch.allclose(mean["w"], (a["w"] + b["w"]) / 2) and int(mean["n"]) == 9
    with pytest.raises(ValueError, match="other tensors"):
        average_state_dicts([a, {"w": a["w"]}])


def test_swa_of_identical_checkpoints_equals_the_checkpoint(snapshot_run, tmp_path):
    data, run = snapshot_run
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    out = tmp_path / "kept_bn" / "checkpoints" / "swa.pt"
    swa_main([str(run), "--checkpoints", "last", "last", "--out", str(out), "--no-update-bn", "--device", "cpu", "--workers", "0"])
    averaged = torch.load(out, weights_only=True)
    assert averaged.keys() >= {"model", "config", "classes", "levels"}
    assert all(torch.equal(averaged["model"][k], last["model"][k]) for k in last["model"])
    # with BatchNorm recomputed: the weights stay, the running statistics are those update_bn gives
    out = run / "checkpoints" / "swa.pt"
    swa_main([str(run), "--checkpoints", "last", str(run / "checkpoints" / "last.pt"), "--device", "cpu", "--workers", "0"])
    recomputed = torch.load(out, weights_only=True)["model"]
    model = load_run(run / "checkpoints" / "last.pt", torch.device("cpu")).model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        update_bn((batch["image"] for batch in bn_loader(TrainConfig.load(run / "config.json"), RunDir(run), 64, 0)), model)
    expected = model.state_dict()
    for key, value in last["model"].items():
        if "running_" in key:
            assert torch.allclose(recomputed[key], expected[key], atol=1e-5), key
        elif value.is_floating_point():
            assert torch.equal(recomputed[key], value), key
    assert any(not torch.allclose(recomputed[k], last["model"][k]) for k in last["model"] if "running_mean" in k)
    # tta_eval loads it like any checkpoint
    result = evaluate([out], data, "test", out=tmp_path / "eval", settings=settings())
    assert result["metrics"]["variants"]["tta_heads"]["species"]["images"] > 0


def test_swa_without_snapshots_says_how_to_get_them(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    assert swa_main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "--snapshots" in error and error.count("\n") == 1


# ------------------------------------------------------- class-based weights
def test_per_class_accuracy_and_weights_follow_the_formula():
    accuracy = per_class_accuracy(np.array([0, 0, 1, 1, 2, -1]), np.array([0, 1, 1, 1, 0, 2]), num_classes=4)
    assert np.allclose(accuracy[:3], [0.5, 1.0, 0.0]) and np.isnan(accuracy[3])
    weights = class_weights_from_accuracy(np.array([[0.5, 1.0, 0.0, np.nan], [1.0, 0.5, 0.0, 0.2]]), power=2.0)
    assert np.allclose(weights[:, 0], [0.25 / 1.25, 1.0 / 1.25])
    assert np.allclose(weights[:, 1], [1.0 / 1.25, 0.25 / 1.25])
    assert np.allclose(weights[:, 2], [0.5, 0.5])  # nobody gets class 2 right: uniform
    assert np.allclose(weights[:, 3], [0.5**2 / (0.5**2 + 0.2**2), 0.2**2 / (0.5**2 + 0.2**2)])  # NaN -> model mean 0.5
    assert np.allclose(class_weights_from_accuracy(np.array([[0.3, 0.0, np.nan]])), 1.0)


def test_class_weighted_ensemble_of_one_model_equals_the_model_and_weights_classes():
    torch.manual_seed(0)
    scores = {"species": torch.log_softmax(torch.randn(5, 4), dim=1)}
    one = class_weighted_ensemble([scores], [{"species": torch.rand(4)}])
    assert torch.allclose(one["species"], scores["species"], atol=1e-6)
    assert torch.allclose(one["species"], ensemble([scores])["species"], atol=1e-6)
    # model A alone decides class 0, model B alone class 1
    a = {"species": torch.log(torch.tensor([[0.7, 0.3]]))}
    b = {"species": torch.log(torch.tensor([[0.2, 0.8]]))}
    mixed = class_weighted_ensemble([a, b], [{"species": torch.tensor([1.0, 0.0])}, {"species": torch.tensor([0.0, 1.0])}])
    assert torch.allclose(mixed["species"], torch.log_softmax(torch.log(torch.tensor([[0.7, 0.8]])), dim=1))


def test_class_weighted_evaluation_of_one_run_equals_plain_evaluation(snapshot_run, tmp_path):
    data, run = snapshot_run
    plain = evaluate([run], data, "test", out=tmp_path / "plain", settings=settings())["metrics"]
    weighted = evaluate([run], data, "test", out=tmp_path / "weighted", settings=settings(class_weighted=True))["metrics"]
    for variant in ("tta_heads", "tta_consistent"):
        for rank in ("genus", "species"):
            assert weighted["variants"][variant][rank]["top1"] == plain["variants"][variant][rank]["top1"]
            assert weighted["variants"][variant][rank]["macro_f1"] == plain["variants"][variant][rank]["macro_f1"]
    with pytest.raises(ValueError, match="model weights"):
        settings(class_weighted=True, model_weights=(1.0,))
