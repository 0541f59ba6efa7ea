"""Post-hoc logit adjustment at evaluation: the offsets, every view adjusted, tau 0 unchanged, auto chosen on validation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import synthetic_model, tiny_train_config
from herbarium import engine
from herbarium.data.readers import read_split
from herbarium.data.splits import read_train_val
from herbarium.demo import make_demo_data
from herbarium.errors import UsageError
from herbarium.evaluation import cli, runner
from herbarium.evaluation.combine import average_views, ensemble
from herbarium.evaluation.decoding import consistent_predictions
from herbarium.evaluation.posthoc import TAU_GRID, adjust_logits, choose_tau, parse_tau, tau_offsets
from herbarium.evaluation.runner import build_view_loader, evaluate, load_run, predict, predict_taus
from herbarium.evaluation.settings import FALLBACK_PRIMARY, EvaluationSettings
from herbarium.evaluation.summary import end_lines
from herbarium.losses.logit_adjusted import LogitAdjustedLoss
from herbarium.run_dir import NORMALIZATION, RUN_FILES
from herbarium.taxonomy import Taxonomy

CPU = torch.device("cpu")


def settings(**changes) -> EvaluationSettings:
    return EvaluationSettings(**{"workers": 0, "device": "cpu", "batch_size": 32, "views": ("plain", "flip"),
                                 "quiet": True, **changes})


# ------------------------------------------------------------------ the adjustment itself
def test_parse_tau_takes_auto_or_a_number_at_least_zero():
    assert parse_tau("auto") == parse_tau("AUTO") == "auto" and parse_tau("0.5") == 0.5
    for bad in ("-0.5", "nan", "inf", "strong"):
        with pytest.raises(ValueError, match="number >= 0 or 'auto'"):
            parse_tau(bad)
    assert EvaluationSettings(posthoc_tau="0.25").posthoc_tau == 0.25
    with pytest.raises(SystemExit) as refused:
        cli.build_parser().parse_args(["RUN", "--data", "D", "--posthoc-tau", "-1"])
    assert refused.value.code == 2


def test_adjusted_logits_are_logits_minus_tau_log_prior_per_rank():
    counts = {"species": [40, 8, 2, 0], "genus": [48, 2]}
    logits = {"species": torch.randn(3, 5, 4), "genus": torch.randn(3, 5, 2)}  # [views, batch, classes]
    adjusted = adjust_logits(logits, tau_offsets(counts, {"species": 4, "genus": 2}, 0.75, CPU))
    for rank, rank_counts in counts.items():
        frequency = np.maximum(np.asarray(rank_counts, dtype=np.float64), 1)  # an unseen class counts once, as in training
        expected = logits[rank].numpy() - 0.75 * np.log(frequency / frequency.sum())
        np.testing.assert_allclose(adjusted[rank].numpy(), expected, rtol=1e-6, atol=1e-6)
    # the prior is the one the logit-adjusted loss trains with
    loss_prior = LogitAdjustedLoss(counts["species"]).log_prior
    assert torch.equal(tau_offsets(counts, {"species": 4}, 1.0, CPU)["species"], loss_prior)
    assert tau_offsets(counts, {"species": 4}, 0.0, CPU) is None
    assert all(adjust_logits(logits, None)[rank] is logits[rank] for rank in logits)  # tau 0: the very same tensors
    with pytest.raises(UsageError, match="species head has 5 classes"):
        tau_offsets(counts, {"species": 5}, 0.5, CPU)


def test_auto_takes_the_best_tau_and_the_smaller_of_a_tie():
    choice = choose_tau({0.0: 0.40, 0.25: 0.52, 0.5: 0.52, 0.75: 0.47}, "tta_consistent", "species", "val (9 images)")
    assert choice.tau == 0.25 and choice.validation_macro_f1[0.5] == 0.52
    assert "tta_consistent" in choice.reason and "val (9 images)" in choice.reason and "0.520" in choice.reason
    assert choice.to_dict()["validation_macro_f1"] == {"0": 0.40, "0.25": 0.52, "0.5": 0.52, "0.75": 0.47}


def test_every_view_of_every_model_is_adjusted_before_averaging():
    records = [{"id": i, "species": f"s{i}", "genus": f"G{i % 5}"} for i in range(20)]
    taxonomy = Taxonomy.from_categories(records, ("genus", "species"))
    rng = np.random.default_rng(0)
    models = [synthetic_model(taxonomy, seed, {"species": rng.integers(0, 50, 20).tolist(),
                                               "genus": rng.integers(1, 90, 5).tolist()}) for seed in range(2)]
    generator = torch.Generator().manual_seed(1)
    batches = [{"views": [torch.rand(6, 3, 3, 4, 4, generator=generator)], "targets": torch.zeros(6, 2, dtype=torch.long),
                "index": torch.arange(6 * b, 6 * b + 6), "skipped": 0} for b in range(3)]
    tau, chosen = 0.6, settings(views=("flip", "flip", "plain"), average="probs", batch_size=6)
    outputs = predict_taus(models, batches, taxonomy, chosen, CPU, (0.0, tau))
    expected = {"tta_heads": [], "tta_consistent": []}
    with torch.no_grad():  # the recipe, batch by batch: each view's logits minus tau * log(prior) of its own model
        for batch in batches:
            views = batch["views"][0]  # [B, V, 3, H, W]
            parts = []
            for loaded in models:
                logits = loaded.model(views.flatten(0, 1))
                prior = {rank: np.log(np.maximum(counts, 1) / np.maximum(counts, 1).sum())
                         for rank, counts in loaded.train_counts.items()}
                parts.append({rank: average_views(value.view(*views.shape[:2], -1).transpose(0, 1)
                                                  - tau * torch.tensor(prior[rank], dtype=torch.float32), "probs")
                              for rank, value in logits.items()})
            scores = ensemble(parts, None, "probs")
            expected["tta_heads"].append({rank: value.argmax(1) for rank, value in scores.items()})
            expected["tta_consistent"].append(consistent_predictions(scores, taxonomy))
    adjusted = outputs[tau]["predictions"]
    for variant, batches_predicted in expected.items():
        for rank in taxonomy.ranks:
            assert np.array_equal(adjusted[variant][rank], torch.cat([p[rank] for p in batches_predicted]).numpy())
    assert any(not np.array_equal(adjusted["tta_heads"][rank], outputs[0.0]["predictions"]["tta_heads"][rank])
               for rank in taxonomy.ranks)  # the adjustment changed something
    # tau 0 scored beside other taus is today's evaluation, bit for bit, every table
    today = predict(models, batches, taxonomy, chosen, CPU)
    for table in ("predictions", "top", "top_probabilities"):
        for variant, ranks in today[table].items():
            for rank, values in ranks.items():
                assert np.array_equal(outputs[0.0][table][variant][rank], values)
    assert outputs[0.0]["disagreement"] == today["disagreement"]


# ------------------------------------------------------------------ a tiny run trained with plain cross-entropy
@pytest.fixture(scope="module")
def ce_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run trained with plain CE on a long tail (40 to 2 images per species), a quarter of train held out to validate."""
    root = tmp_path_factory.mktemp("posthoc")
    data = root / "demo"
    make_demo_data(data, seed=2, image_size=32, max_per_class=40, min_per_class=2, test_per_class=4)
    cfg = tiny_train_config(data, root / "run", epochs=3)
    cfg = replace(cfg, data=replace(cfg.data, val_split=None, holdout=0.25), loss=replace(cfg.loss, loss="ce"))
    engine.train(cfg)
    return data, Path(cfg.out)


def copy_run(run: Path, to: Path, counts: bool = True, **data_changes) -> Path:
    """The run's files and last checkpoint under ``to``; without its recorded training counts, or with its config's data changed."""
    (to / "checkpoints").mkdir(parents=True)
    for name in RUN_FILES:
        (to / name).write_text((run / name).read_text())
    if not counts:
        normalization = json.loads((to / NORMALIZATION).read_text())
        del normalization["train_counts"]
        (to / NORMALIZATION).write_text(json.dumps(normalization))
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["data"].update(data_changes)
    torch.save(state, to / "checkpoints" / "last.pt")
    return to


def test_a_positive_tau_raises_the_rare_classes_share_of_predictions(ce_run):
    data, run = ce_run
    loaded = load_run(run, CPU)
    counts = np.asarray(loaded.train_counts["species"])
    rare = counts <= np.quantile(counts, 1 / 3)  # the rarest third of the species by training images
    test = read_split(data, "test", taxonomy=loaded.taxonomy)
    loader = build_view_loader(test, loaded.taxonomy, [loaded], settings(), CPU)
    outputs = predict_taus([loaded], loader, loaded.taxonomy, settings(), CPU, TAU_GRID)
    predicted_rare = {tau: rare[outputs[tau]["predictions"]["tta_heads"]["species"]] for tau in TAU_GRID}
    assert predicted_rare[1.0].mean() > predicted_rare[0.0].mean()
    for smaller, larger in zip(TAU_GRID, TAU_GRID[1:]):  # an image predicted rare stays rare as tau grows
        assert not (predicted_rare[smaller] & ~predicted_rare[larger]).any()


def test_auto_chooses_tau_on_the_validation_split_only_and_says_so(ce_run, tmp_path, monkeypatch):
    data, run = ce_run
    validation = read_train_val(load_run(run, CPU).config)[1]
    seen = []

    def scores(outputs, taxonomy, variant):  # validation prefers 0.25 and 0.5 equally: the smaller wins
        seen.append((sorted(outputs), variant, {len(at_tau["index"]) for at_tau in outputs.values()}))
        return {0.0: 0.1, 0.25: 0.3, 0.5: 0.3, 0.75: 0.2, 1.0: 0.1}

    monkeypatch.setattr(runner, "finest_macro_f1_by_tau", scores)
    result = evaluate([run], data, "test", out=tmp_path / "auto", settings=settings(posthoc_tau="auto"))
    assert seen == [(sorted(TAU_GRID), FALLBACK_PRIMARY, {len(validation)})]  # one pass over validation, every tau
    assert len(validation) != len(read_split(data, "test"))
    choice = result["metrics"]["posthoc_tau"]
    assert choice["tau"] == 0.25 and "validation split" in choice["reason"] and "among tau 0, 0.25, 0.5, 0.75, 1" in choice["reason"]
    assert any(line.startswith("post-hoc logit adjustment: tau 0.25 (auto:") for line in end_lines(result))
    assert "tau 0.25" in (tmp_path / "auto" / "report.md").read_text()
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["posthoc_tau"]["tau"] == 0.25
    # the test split is then scored at the chosen tau, exactly as with --posthoc-tau 0.25
    fixed = evaluate([run], data, "test", out=tmp_path / "fixed", settings=settings(posthoc_tau=0.25, primary=result["metrics"]["primary"]))
    assert {v: r["species"]["macro_f1"] for v, r in result["metrics"]["variants"].items()} == \
           {v: r["species"]["macro_f1"] for v, r in fixed["metrics"]["variants"].items()}


def test_auto_without_a_validation_split_keeps_the_logits(ce_run, tmp_path):
    data, run = ce_run
    no_val = copy_run(run, tmp_path / "run", holdout=0.0)
    result = evaluate([no_val], data, "test", out=tmp_path / "eval", settings=settings(posthoc_tau="auto"))
    choice = result["metrics"]["posthoc_tau"]
    assert choice["tau"] == 0.0 and "no labelled validation split" in choice["reason"] and not choice["validation_macro_f1"]


def test_counts_the_run_did_not_record_are_read_from_its_training_split(ce_run, tmp_path):
    data, run = ce_run
    recorded = evaluate([copy_run(run, tmp_path / "recorded")], data, "test", out=tmp_path / "a",
                        settings=settings(posthoc_tau=0.5, primary="tta_heads"))["metrics"]
    counted = evaluate([copy_run(run, tmp_path / "counted", counts=False)], data, "test", out=tmp_path / "b",
                       settings=settings(posthoc_tau=0.5, primary="tta_heads"))["metrics"]
    assert recorded["variants"] == counted["variants"]


def test_a_run_without_training_counts_is_a_one_line_error(ce_run, tmp_path, capsys):
    data, run = ce_run
    lost = copy_run(run, tmp_path / "run", counts=False, data=str(tmp_path / "moved"))
    status = cli.main([str(lost), "--data", str(data), "--out", str(tmp_path / "eval"), "--posthoc-tau", "0.5",
                       "--workers", "0", "--device", "cpu", "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1
    assert error[0].startswith(f"error: {lost}") and "--posthoc-tau needs the training class counts" in error[0]
    assert not (tmp_path / "eval").exists()
