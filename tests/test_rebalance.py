"""Classifier re-balancing after training: cRT and LWS on a run's frozen trunk, written as a new run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import herbarium
from herbarium import cli, engine
from herbarium.checkpoint import load_checkpoint, save_checkpoint
from herbarium.data.readers import read_split
from herbarium.demo import make_demo_data
from herbarium.evaluation.runner import evaluate, load_run
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.export import export
from herbarium.rebalance import RebalanceSettings, embed_split, epoch_batches, rebalance, rebalance_split
from herbarium.run_dir import RunDir, evaluated_weights
from fixtures import tiny_train_config

SETTINGS = RebalanceSettings(device="cpu", workers=0, epochs=10, batch_size=32, views=("plain",), quiet=True)
EVALUATE = EvaluationSettings(views=("plain",), workers=0, device="cpu", batch_size=64, quiet=True, primary="tta_heads")


def write_run(data: Path, out: Path, **model: object) -> Path:
    """An untrained run (freshly initialised trunk and heads) trained on every image of ``data``'s train split."""
    cfg = tiny_train_config(data, out, epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_split=None),
                              model=dataclasses.replace(cfg.model, **model))
    trainer = engine.Trainer(cfg)
    trainer.write_run_files()
    trainer.save("last")
    return out


@pytest.fixture(scope="module")
def skewed_run(tmp_path_factory) -> tuple[Path, Path]:
    """8 species with 40 down to 2 training images each (a balanced test split of 4 each), and a run on them."""
    root = tmp_path_factory.mktemp("rebalance")
    data = root / "demo"
    make_demo_data(data, seed=0, image_size=32, max_per_class=40, min_per_class=2, test_per_class=4, num_families=2,
                   genera_per_family=2, species_per_genus=2)
    return data, write_run(data, root / "run")


def heads_and_trunk(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    heads = {key: value for key, value in state.items() if key.startswith("heads.")}
    return heads, {key: value for key, value in state.items() if key not in heads}


def test_crt_retrains_only_the_heads_into_a_run_that_evaluates_and_loads(skewed_run, tmp_path):
    data, run = skewed_run
    out = rebalance(run, tmp_path / "crt", SETTINGS)
    before_heads, before_trunk = heads_and_trunk(evaluated_weights(load_checkpoint(RunDir(run).last)))
    state = load_checkpoint(RunDir(out).checkpoint("best"))
    after_heads, after_trunk = heads_and_trunk(state["model"])
    assert after_trunk.keys() == before_trunk.keys()
    assert all(torch.equal(after_trunk[key], before_trunk[key]) for key in before_trunk)  # bit for bit
    assert all(not torch.equal(after_heads[key], before_heads[key]) for key in before_heads)
    assert out.stat().st_mode & 0o777 == 0o755  # a run folder for everyone to read, as training makes it
    assert {p.name for p in out.iterdir()} >= {"run.json", "config.json", "taxonomy.json", "normalization.json",
                                                 "rebalance.json", "checkpoints"}
    record = json.loads((out / "rebalance.json").read_text())
    assert record["method"] == "crt" and record["images"] == 111 and record["settings"]["sampler"] == "balanced"
    assert state["rebalance"] == record and RunDir(out).read_config().out == str(out)
    assert set(record["loss_per_epoch"]) == {"species", "genus", "family"}
    assert all(losses[-1] < losses[0] for losses in record["loss_per_epoch"].values())

    metrics = evaluate([out], data, "test", out=tmp_path / "eval", settings=EVALUATE)["metrics"]
    assert metrics["variants"]["tta_heads"]["species"]["images"] == 32
    images = sorted((data / "test").rglob("*.jpg"))[:4]
    predicted = [p.top["species"] for p in herbarium.load(out, device="cpu").predict(images)]
    export(out)
    assert [p.top["species"] for p in herbarium.load(RunDir(out).export_dir, device="cpu").predict(images)] == predicted


def species_recall(run: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """(recall [C], images predicted [C]) of the run's consistent species on ``data``'s test split."""
    loaded = herbarium.load(run, device="cpu")
    split = read_split(data, "test", taxonomy=loaded.taxonomy)
    truth = np.array([loaded.taxonomy.targets(sample.category_id)["species"] for sample in split.samples])
    names = loaded.taxonomy.names["species"]
    predictions = loaded.predict([split.path(sample) for sample in split.samples], batch_size=64)
    predicted = np.array([names.index(p.consistent["species"]) for p in predictions])
    classes = len(names)
    hits = np.bincount(truth[predicted == truth], minlength=classes)
    return hits / np.bincount(truth, minlength=classes), np.bincount(predicted, minlength=classes)


def test_balanced_sampling_raises_the_rare_classes_recall(skewed_run, tmp_path):
    """The same frozen features re-trained with balanced draws and with every image alike (the paper's control)."""
    data, run = skewed_run
    recall, predicted = {}, {}
    for sampler in ("balanced", "none"):
        out = rebalance(run, tmp_path / sampler, dataclasses.replace(SETTINGS, sampler=sampler, epochs=20))
        recall[sampler], predicted[sampler] = species_recall(out, data)
    counts = np.array(RunDir(run).read_normalization()["train_counts"]["species"])
    rare = counts < np.median(counts)
    assert recall["balanced"][rare].mean() > recall["none"][rare].mean() + 0.2
    assert predicted["balanced"][rare].sum() > predicted["none"][rare].sum()
    assert recall["balanced"].mean() > recall["none"].mean()  # the test split is balanced: this is its top-1


def test_lws_keeps_each_class_direction_and_only_scales_it(skewed_run, tmp_path, capsys):
    _, run = skewed_run
    out = tmp_path / "lws"
    assert cli.main(["rebalance", str(run), "--method", "lws", "--out", str(out), "--device", "cpu", "--workers", "0",
                     "--epochs", "5", "--batch-size", "32", "--views", "plain", "--quiet"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    before_heads, before_trunk = heads_and_trunk(evaluated_weights(load_checkpoint(RunDir(run).last)))
    after_heads, after_trunk = heads_and_trunk(load_checkpoint(RunDir(out).checkpoint("best"))["model"])
    assert all(torch.equal(after_trunk[key], before_trunk[key]) for key in before_trunk)
    for rank in ("species", "genus", "family"):
        weight, new_weight = before_heads[f"heads.{rank}.fc.weight"], after_heads[f"heads.{rank}.fc.weight"]
        scales = new_weight.norm(dim=1) / weight.norm(dim=1)  # [C]
        torch.testing.assert_close(new_weight, weight * scales[:, None])  # same direction, one factor per class
        torch.testing.assert_close(after_heads[f"heads.{rank}.fc.bias"], before_heads[f"heads.{rank}.fc.bias"] * scales)
        assert not torch.allclose(scales, torch.ones_like(scales), atol=1e-3)
    assert json.loads((out / "rebalance.json").read_text())["method"] == "lws"


def test_balanced_draws_give_every_class_an_even_share():
    labels = torch.cat([torch.zeros(3000), torch.ones(30), torch.full((3,), 2), torch.full((50,), -1)]).long()
    drawn = torch.cat(epoch_batches(labels, "balanced", seed=1, epoch=0, batch_size=256))
    assert len(drawn) == 3033 and (labels[drawn] >= 0).all()  # as many draws as labelled rows, unlabelled never
    shares = torch.bincount(labels[drawn], minlength=3) / len(drawn)
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3), atol=0.04, rtol=0)
    plain = torch.cat(epoch_batches(labels, "none", seed=1, epoch=0, batch_size=256))
    assert torch.equal(torch.bincount(labels[plain], minlength=3), torch.tensor([3000, 30, 3]))  # each row once
    again = torch.cat(epoch_batches(labels, "balanced", seed=1, epoch=0, batch_size=256))
    assert torch.equal(drawn, again) and not torch.equal(drawn, torch.cat(epoch_batches(labels, "balanced", 1, 1, 256)))


def test_augmented_views_are_cached_beside_the_plain_one(skewed_run):
    data, run = skewed_run
    loaded = load_run(run, torch.device("cpu"))
    split = rebalance_split(loaded.config, loaded.taxonomy, "train")
    plain = embed_split(loaded, split, SETTINGS, torch.device("cpu"), skip_bad_images=False)
    views = embed_split(loaded, split, dataclasses.replace(SETTINGS, views=("train", "plain")), torch.device("cpu"),
                        skip_bad_images=False)
    assert plain.features.shape == (111, 1, loaded.model.num_features)
    assert views.features.shape == (111, 2, loaded.model.num_features)
    torch.testing.assert_close(views.features[:, 1], plain.features[:, 0])
    assert not torch.allclose(views.features[:, 0], plain.features[:, 0])
    assert torch.equal(views.labels, plain.labels)


def test_the_runs_moving_average_is_the_trunk_kept(skewed_run, tmp_path):
    _, run = skewed_run
    averaged = tmp_path / "averaged"
    RunDir(run).copy_files_to(RunDir(averaged))
    state = load_checkpoint(RunDir(run).last)
    state["ema"] = {key: value + 1 if value.is_floating_point() else value for key, value in state["model"].items()}
    save_checkpoint(state, RunDir(averaged).last)
    out = rebalance(averaged, tmp_path / "crt", dataclasses.replace(SETTINGS, epochs=1))
    _, trunk = heads_and_trunk(load_checkpoint(RunDir(out).checkpoint("best"))["model"])
    assert all(torch.equal(trunk[key], state["ema"][key]) for key in trunk)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        status = cli.main(["rebalance", *argv, "--device", "cpu", "--workers", "0", "--quiet"])
    except SystemExit as stop:  # argparse's refusal of an option
        status = stop.code
    return status, capsys.readouterr().err


def test_bad_input_gets_one_line_errors(skewed_run, tmp_path, capsys):
    data, run = skewed_run
    status, err = run_cli(capsys, str(tmp_path / "nowhere"), "--out", str(tmp_path / "new"))
    assert status == 2 and err.count("\n") == 1 and err.startswith("error:") and "nowhere" in err
    status, err = run_cli(capsys, str(run), "--method", "focal", "--out", str(tmp_path / "new"))
    assert status == 2 and err.count("\n") == 1 and "--method" in err and "crt" in err
    status, err = run_cli(capsys, str(run), "--out", str(run))
    assert status == 2 and err.count("\n") == 1 and "not an empty folder" in err
    arcface = write_run(data, tmp_path / "arcface", embedding_dim=16, arcface_levels=("species",), dropout=0.0)
    status, err = run_cli(capsys, str(arcface), "--out", str(tmp_path / "new"))
    assert status == 2 and err.count("\n") == 1 and "species head is arcface" in err
    tree = write_run(data, tmp_path / "tree", tree_logits=True)
    status, err = run_cli(capsys, str(tree), "--out", str(tmp_path / "new"))
    assert status == 2 and err.count("\n") == 1 and "--tree-logits" in err
    other = tmp_path / "other"
    make_demo_data(other, seed=1, image_size=32, max_per_class=3, min_per_class=2, test_per_class=1, num_families=1)
    status, err = run_cli(capsys, str(run), "--data", str(other), "--out", str(tmp_path / "new"))
    assert status == 2 and err.count("\n") == 1 and "not those the run was trained on" in err
    assert not (tmp_path / "new").exists()  # nothing half-written
