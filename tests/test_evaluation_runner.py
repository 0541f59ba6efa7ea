"""TTA evaluation end to end on a tiny trained run: views, ensembles, safety, report and submission."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import synthetic_model
from herbarium import engine
from herbarium.checkpoint import CheckpointError
from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from herbarium.data.dataset import ImageDataset
from herbarium.data.readers import read_split
from herbarium.data.transforms import eval_transform
from herbarium.demo import make_demo_data
from herbarium.evaluation.combine import average_views, ensemble
from herbarium.evaluation.decoding import consistent_predictions, consistent_scores
from herbarium.evaluation.report import md_escape
from herbarium.evaluation.runner import evaluate, load_run, predict, primary_from_validation
from herbarium.evaluation.settings import FALLBACK_PRIMARY, EvaluationSettings
from herbarium.run_dir import RUN_FILES
from herbarium.evaluation.tta import parse_views
from herbarium.models.config import ModelConfig
from herbarium.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    data = root / "demo"
    make_demo_data(data, seed=1, image_size=32, max_per_class=20, min_per_class=2, test_per_class=3)
    cfg = TrainConfig(
        out=str(root / "run"), epochs=2, seed=0, device="cpu",
        data=DataConfig(data=str(data), val_split="test", size=32, batch_size=16, workers=0),
        model=ModelConfig(pretrained=False, trunk="resnet10t", dropout=0.0),
        loss=LossConfig(levels=("species", "genus", "family")),
        optim=OptimConfig(optim="adam@2e-3:0", schedule="constant"),
    )
    engine.train(cfg)
    return data, Path(cfg.out)


def settings(**changes) -> EvaluationSettings:
    return EvaluationSettings(**{"workers": 0, "device": "cpu", "batch_size": 8, **changes})


def test_parse_views():
    assert parse_views("4") == ("train", "train", "train", "plain")
    assert parse_views("plain,flip") == ("plain", "flip")
    with pytest.raises(ValueError):
        parse_views("0")


def test_one_plain_view_equals_plain_evaluation(trained, tmp_path):
    data, run = trained
    result = evaluate([run], data, "test", out=tmp_path, settings=settings(views=("plain",)))
    loaded = load_run(run, torch.device("cpu"))
    split = read_split(data, "test", taxonomy=loaded.taxonomy)
    dataset = ImageDataset(split, ("species",), eval_transform(32, loaded.profile.mean, loaded.profile.std))
    with torch.no_grad():
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        expected = loaded.model(images)["species"].argmax(dim=1)
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == len(split)
    heads = json.loads((tmp_path / "metrics.json").read_text())["variants"]["tta_heads"]["species"]
    assert heads["top1"] == pytest.approx(float((expected == dataset.targets[:, 0]).float().mean()))
    assert "single_view_heads" not in result["metrics"]["variants"]


def test_four_views_report_submission_and_consistency(trained, tmp_path):
    data, run = trained
    result = evaluate([run], data, "test", out=tmp_path, settings=settings(primary="tta_consistent"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    variants = metrics["variants"]
    assert metrics["primary"] == "tta_consistent" and metrics["primary_choice"]["reason"] == "chosen with --primary"
    assert set(variants) == {f"{scores}_{decoding}" for scores in ("tta", "single_view")
                             for decoding in ("heads", "consistent", "hybrid")}
    for name in ("tta", "single_view"):  # hybrid: species from its head, genus and family from the path
        assert variants[f"{name}_hybrid"]["species"] == variants[f"{name}_heads"]["species"]
        assert variants[f"{name}_hybrid"]["genus"] == variants[f"{name}_consistent"]["genus"]
    species_f1 = variants["tta_consistent"]["species"]["macro_f1"]
    headline = metrics["headline"]  # the headline figure with its bootstrap interval, on every labelled image
    assert headline["variant"] == "tta_consistent" and headline["macro_f1"] == pytest.approx(species_f1)
    assert headline["low"] <= species_f1 <= headline["high"] and headline["images"] == len(read_split(data, "test"))
    assert f"{species_f1:.3f}" in (tmp_path / "report.md").read_text()
    assert f"{species_f1:.3f}" in (tmp_path / "report.html").read_text()
    rows = list(csv.reader((tmp_path / "submission.csv").open()))
    split = read_split(data, "test")
    assert rows[0] == ["Id", "Predicted"] and len(rows) == len(split) + 1
    assert {int(r[1]) for r in rows[1:]} <= set(split.taxonomy.category_ids)
    assert metrics["throughput"]["images_per_s"] > 0 and metrics["throughput"]["views"] == 4
    # consistent decoding: every prediction is a valid path (genus of the species = predicted genus)
    predictions = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    taxonomy = load_run(run, torch.device("cpu")).taxonomy
    genus_of = {taxonomy.names["species"][i]: taxonomy.names["genus"][g] for i, g in enumerate(taxonomy.ancestor_map("species", "genus").tolist())}
    assert all(genus_of[row["species"]] == row["genus"] for row in predictions)


def test_primary_variant_is_chosen_on_the_runs_validation_split(trained, tmp_path):
    data, run = trained  # the run validated on "test", so the choice is made on the very images scored here
    metrics = evaluate([run], data, "test", out=tmp_path, settings=settings(views=("plain", "flip")))["metrics"]
    scored = {name: ranks["species"]["macro_f1"] for name, ranks in metrics["variants"].items()}
    choice = metrics["primary_choice"]
    assert choice["validation_macro_f1"] == pytest.approx(scored)
    best = max(scored, key=scored.get)
    assert metrics["primary"] == choice["variant"] in (best, FALLBACK_PRIMARY)
    assert "validation split" in choice["reason"] and md_escape(choice["reason"]) in (tmp_path / "report.md").read_text()


def validation_outputs(correct_share: dict[str, float], images: int = 300, classes: int = 30) -> tuple[dict, Taxonomy]:
    """Predictions of every variant on a flat labelled split: each variant right on about ``correct_share`` of the images."""
    taxonomy = Taxonomy.from_categories([{"id": i, "species": f"s{i}"} for i in range(classes)], ("species",))
    rng = np.random.default_rng(0)
    truth = rng.integers(0, classes, images)
    predictions, top = {}, {}
    for variant, share in correct_share.items():
        predicted = np.where(rng.random(images) < share, truth, rng.integers(0, classes, images))
        predictions[variant], top[variant] = {"species": predicted}, {"species": predicted[:, None]}
    return {"targets": truth[:, None], "predictions": predictions, "top": top}, taxonomy


def test_another_variant_replaces_the_default_only_when_validation_clearly_prefers_it():
    near, taxonomy = validation_outputs({"tta_consistent": 0.60, "tta_heads": 0.60, "single_view_heads": 0.62})
    choice = primary_from_validation(near, taxonomy, "val")
    assert max(choice.validation_macro_f1, key=choice.validation_macro_f1.get) != FALLBACK_PRIMARY
    assert choice.variant == FALLBACK_PRIMARY and "not clearly better" in choice.reason
    far, taxonomy = validation_outputs({"tta_consistent": 0.40, "tta_heads": 0.80})
    choice = primary_from_validation(far, taxonomy, "val")
    assert choice.variant == "tta_heads" and f"above {FALLBACK_PRIMARY}" in choice.reason


def test_run_without_a_validation_split_headlines_the_fallback_variant(trained, tmp_path):
    data, run = trained
    no_val = tmp_path / "run"
    (no_val / "checkpoints").mkdir(parents=True)
    for name in RUN_FILES:
        (no_val / name).write_text((run / name).read_text())
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["data"].update(val_split=None, holdout=0.0)
    torch.save(state, no_val / "checkpoints" / "last.pt")
    metrics = evaluate([no_val], data, "test", out=tmp_path / "eval", settings=settings(views=("plain", "flip")))["metrics"]
    assert metrics["primary"] == FALLBACK_PRIMARY and "no labelled validation split" in metrics["primary_choice"]["reason"]


def test_ensemble_of_a_model_with_itself_equals_the_model(trained, tmp_path):
    data, run = trained
    single = evaluate([run], data, "test", out=tmp_path / "one", settings=settings(views=("plain", "flip")))
    double = evaluate([run, run], data, "test", out=tmp_path / "two", settings=settings(views=("plain", "flip"), model_weights=(0.3, 0.7)))
    one = single["metrics"]["variants"]["tta_heads"]["species"]
    two = double["metrics"]["variants"]["tta_heads"]["species"]
    assert one["top1"] == two["top1"] and one["macro_f1"] == two["macro_f1"]


def test_unlabelled_split_gets_a_submission_and_a_report(trained, tmp_path, monkeypatch):
    data, run = trained
    monkeypatch.setenv("HERBARIUM_ALLOW_SYMLINKS_OUT", "1")  # the images folder below links to another dataset's
    meta = json.loads((data / "test" / "metadata.json").read_text())
    unlabelled = tmp_path / "data" / "test"
    unlabelled.mkdir(parents=True)
    (unlabelled / "images").symlink_to((data / "test" / "images").resolve())
    (unlabelled / "metadata.json").write_text(json.dumps({"images": meta["images"], "info": {}, "licenses": []}))
    result = evaluate([run], tmp_path / "data", "test", out=tmp_path / "out", settings=settings(views=("plain",)))
    assert "variants" not in result["metrics"]
    rows = list(csv.reader((tmp_path / "out" / "submission.csv").open()))
    assert len(rows) == len(meta["images"]) + 1
    assert (tmp_path / "out" / "report.html").is_file()
    # the predicted class distribution and a confidence histogram stand in for the metrics
    summary = result["metrics"]["unlabelled_predictions"]
    assert summary["images"] == len(meta["images"]) and sum(c["images"] for c in summary["most_predicted"]) <= summary["images"]
    assert sum(summary["confidence_histogram"]["counts"]) == summary["images"]
    assert "## Predictions" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "plots" / "confidence.png").is_file()
    predictions = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert all(row["true_species"] == "" and row["path"].endswith(".jpg") for row in predictions)


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoint_with_a_pickled_object_is_refused(trained, tmp_path):
    _, run = trained
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["extra"] = Payload()
    bad_run = tmp_path / "bad"
    (bad_run / "checkpoints").mkdir(parents=True)
    for name in RUN_FILES:
        (bad_run / name).write_text((run / name).read_text())
    torch.save(state, bad_run / "checkpoints" / "last.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match="refused"):
        load_run(bad_run, torch.device("cpu"))


# ------------------------------------------------------ predict against the plain per-batch recipe
def loop_disagreement(predictions: dict[str, torch.Tensor], taxonomy: Taxonomy) -> int:
    """Images whose per-rank predictions leave the tree, one image and one category at a time."""
    ancestors = {path[-1]: path for path in taxonomy.paths}  # finest class -> its path
    genus_of = {path[1]: path[0] for path in taxonomy.paths}
    return sum(int(predictions["genus"][i] != ancestors[int(s)][1] or predictions["family"][i] != genus_of[int(predictions["genus"][i])])
               for i, s in enumerate(predictions["species"]))


def reference_outputs(models, batches, taxonomy, average: str) -> dict:
    """What ``predict`` computes, rebuilt from the public pieces batch by batch, with a loop for the disagreement."""
    kept = {"predictions": {}, "top": {}, "top_probabilities": {}}
    inconsistent = {}
    for batch in batches:
        views = batch["views"][0]  # [B, V, 3, H, W]
        tta_parts, single_parts = [], []
        for loaded in models:
            logits = loaded.model(views.flatten(0, 1))
            per_view = {rank: value.view(*views.shape[:2], -1).transpose(0, 1) for rank, value in logits.items()}
            tta_parts.append({rank: average_views(value, average) for rank, value in per_view.items()})
            single_parts.append({rank: torch.log_softmax(value[-1], dim=1) for rank, value in per_view.items()})
        for name, parts in (("tta", tta_parts), ("single_view", single_parts)):
            scores = ensemble(parts, None, average)
            heads = {rank: value.argmax(1) for rank, value in scores.items()}
            decoded = (consistent_predictions(scores, taxonomy), consistent_scores(scores, taxonomy))
            hybrid = ({**decoded[0], "species": heads["species"]}, {**decoded[1], "species": scores["species"]})
            for variant, (predicted, variant_scores) in ((f"{name}_heads", (heads, scores)), (f"{name}_consistent", decoded),
                                                         (f"{name}_hybrid", hybrid)):
                for rank in taxonomy.ranks:
                    top = torch.softmax(variant_scores[rank], dim=1).topk(3, dim=1)
                    for table, value in ((kept["predictions"], predicted[rank]), (kept["top"], top.indices),
                                         (kept["top_probabilities"], top.values)):
                        table.setdefault(variant, {}).setdefault(rank, []).append(value)
            inconsistent[f"{name}_heads"] = inconsistent.get(f"{name}_heads", 0) + loop_disagreement(heads, taxonomy)
    images = sum(len(batch["index"]) for batch in batches)
    return {**{key: {v: {r: torch.cat(parts).numpy() for r, parts in ranks.items()} for v, ranks in table.items()}
                 for key, table in kept.items()},
            "disagreement": {name: count / images for name, count in inconsistent.items()}}


@pytest.mark.parametrize("members", [1, 2])
def test_predict_equals_the_plain_per_batch_recipe(members):
    records = [{"id": i, "species": f"s{i}", "genus": f"G{i % 7}", "family": f"F{i % 7 % 3}"} for i in range(40)]
    taxonomy = Taxonomy.from_categories(records)
    models = [synthetic_model(taxonomy, seed) for seed in range(members)]
    generator = torch.Generator().manual_seed(1)
    batches = [{"views": [torch.rand(6, 3, 3, 4, 4, generator=generator)], "targets": torch.zeros(6, 3, dtype=torch.long),
                "index": torch.arange(6 * b, 6 * b + 6), "skipped": 0} for b in range(4)]
    outputs = predict(models, batches, taxonomy, settings(views=("flip", "flip", "plain")), torch.device("cpu"))
    with torch.no_grad():
        expected = reference_outputs(models, batches, taxonomy, "logits")
    assert set(expected["predictions"]) == {f"{scores}_{decoding}" for scores in ("tta", "single_view")
                                            for decoding in ("heads", "consistent", "hybrid")}
    assert set(expected["predictions"]) <= set(outputs["predictions"])
    for variant, ranks in expected["predictions"].items():
        for rank in ranks:
            assert np.array_equal(outputs["predictions"][variant][rank], expected["predictions"][variant][rank])
            assert np.array_equal(outputs["top"][variant][rank][:, :3], expected["top"][variant][rank])
            np.testing.assert_allclose(outputs["top_probabilities"][variant][rank][:, :3],
                                       expected["top_probabilities"][variant][rank], rtol=1e-5, atol=1e-7)
    assert outputs["disagreement"] == pytest.approx(expected["disagreement"])
    assert outputs["disagreement"]["tta_heads"] > 0  # the loop had something to count
