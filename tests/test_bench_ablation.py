"""The ablation of the defaults (bench/ablation.py): each setting undoes what it says, and the summary's arithmetic."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from herbarium.evaluation.cli import build_parser as evaluation_parser
from herbarium.evaluation.cli import settings_from_args
from herbarium.evaluation.settings import EvaluationSettings

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ablation = _load("ablation")
accuracy = ablation.accuracy
BUDGET = accuracy.Budget(data="/data/grocery", val_split=None, test_split="val", size=64, epochs=3, device="cpu")
RECIPE_SETTINGS = ("old_optim", "old_loss", "old_dropout", "holdout")  # each puts back part of --recipe herbarium2020


def _config(out: Path, recipe_arm: str = "herbarium", extra: list[str] | None = None) -> dict:
    arm = accuracy.build_arms(BUDGET, out, (recipe_arm,), extra or [])[recipe_arm]
    return accuracy.flat_config(arm.train)


def _changed(out: Path, setting: str) -> dict:
    defaults, changed = _config(out), _config(out, extra=ablation.setting_args(setting, out))
    return {key: value for key, value in changed.items() if value != defaults[key]}


@pytest.mark.parametrize("setting", RECIPE_SETTINGS)
def test_a_setting_puts_back_the_herbarium2020_recipes_values(tmp_path, setting):
    changed = _changed(tmp_path, setting)
    recipe = _config(tmp_path, "herbarium2020")
    assert changed, f"{setting} changes nothing"
    assert {key: recipe[key] for key in changed} == changed


def test_the_other_settings_change_one_thing(tmp_path):
    assert _changed(tmp_path, "defaults") == {}
    assert _changed(tmp_path, "plain_ce") == {"loss.loss": "ce"}
    stats = _changed(tmp_path, "old_norm")
    assert list(stats) == ["data.stats"]
    assert json.loads(Path(stats["data.stats"]).read_text()) == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_each_lever_adds_one_setting_to_the_defaults(tmp_path):
    assert _changed(tmp_path, "ema") == {"optim.ema_decay": 0.9998}
    assert _changed(tmp_path, "mixup") == {"data.mixup": 0.2}
    assert _changed(tmp_path, "cutmix") == {"data.cutmix": 1.0}
    assert _changed(tmp_path, "trunk_lr") == {"optim.trunk_lr_scale": 0.1}
    assert _changed(tmp_path, "layer_decay") == {"optim.layer_decay": 0.9}
    assert _changed(tmp_path, "trivial") == {"data.augment": "crop_flip_trivial"}
    assert _changed(tmp_path, "species_only") == {"loss.levels": ("species",)}
    assert _changed(tmp_path, "coarse_light") == {"loss.level_weights": {"genus": 0.5, "family": 0.25}}
    assert _changed(tmp_path, "dropout") == {"model.dropout": 0.2}


def test_every_setting_is_scored_on_validation_data_with_no_validation_split(tmp_path):
    args = ablation.build_parser().parse_args(["--data", "/data/grocery", "--out", str(tmp_path)])
    assert args.score_split == "val" and (args.size, args.epochs) == (64, 10)
    for setting in args.settings:
        parsed = accuracy.build_parser().parse_args(ablation.harness_argv(args, 2, setting))
        assert (parsed.val_split, parsed.test_split, parsed.seed) == (None, "val", 2)
        assert parsed.out == str(tmp_path / "s2" / setting)
        assert parsed.only == ((ablation.REFERENCE_ARM,) if setting == ablation.REFERENCE_ARM else ("herbarium",))


def _record(predictions: list[int], truth: list[int], species_f1: float) -> dict:
    ids = [str(i) for i in range(len(truth))]
    metrics = {rank: {"macro_f1": value} for rank, value in (("family", 0.9), ("genus", 0.5), ("species", species_f1))}
    return {"variant": "tta_consistent", "metrics": metrics, "per_image": dict(zip(ids, predictions)),
            "truth": dict(zip(ids, truth)), "budget": accuracy.dataclasses.asdict(BUDGET), "hardware": "cpu"}


def _write(out: Path, seed: int, setting: str, arm: str, record: dict) -> None:
    path = out / f"s{seed}" / setting / arm / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))


def test_summary_gives_the_spread_over_seeds_and_the_margin_to_the_defaults(tmp_path):
    truth = [0, 1, 2, 3] * 5
    for seed, score in ((0, 0.6), (1, 0.8)):
        _write(tmp_path, seed, "defaults", "herbarium", _record(truth, truth, score))
        _write(tmp_path, seed, "plain_ce", "herbarium", _record([0] * 20, truth, score - 0.2))
    summary = ablation.write_summary(tmp_path)
    rows = {row["setting"]: row for row in summary["rows"]}
    assert summary["ranks"] == ["species", "genus", "family"]
    assert rows["defaults"]["species"]["mean"] == pytest.approx(0.7)
    assert rows["defaults"]["species"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["plain_ce"]["species"]["per_seed"] == pytest.approx([0.4, 0.6])
    assert all(margin["delta"] == 0 for margin in rows["defaults"]["margins"].values())
    for margin in rows["plain_ce"]["margins"].values():  # always predicting class 0: macro-F1 0.1 against 1.0
        assert margin["delta"] == pytest.approx(0.1 - 1.0) and margin["high"] < 0
    assert "| plain_ce | plain cross-entropy" in (tmp_path / "ablation.md").read_text()


eval_levers = _load("eval_levers")


@pytest.mark.parametrize("lever", list(eval_levers.EVAL_LEVERS))
def test_an_evaluation_lever_parses_and_keeps_the_runs_own_training_split_as_gallery(lever):
    args = eval_levers.lever_args(lever, BUDGET)
    settings = settings_from_args(evaluation_parser().parse_args(["run", "--data", BUDGET.data, *args]))
    if "--retrieval-gallery" in args:
        assert settings.retrieval_gallery == BUDGET.train_split and settings.primary == "retrieval_consistent"
    changed = {name for name, value in vars(settings).items() if value != getattr(EvaluationSettings(), name)}
    assert bool(changed) == (lever not in (eval_levers.BASELINE, *eval_levers.REBALANCED))
    if lever in eval_levers.REBALANCED:  # a re-balanced run, scored with the evaluation's defaults
        assert eval_levers.REBALANCED[lever] in eval_levers.rebalance.METHODS


def test_evaluation_levers_are_compared_with_the_same_runs_default_evaluation(tmp_path):
    truth = [0, 1, 2, 3] * 5
    records = {seed: {eval_levers.BASELINE: _record(truth, truth, score), "plain": _record([0] * 20, truth, score - 0.1)}
               for seed, score in ((0, 0.6), (1, 0.8))}
    summary = eval_levers.write_summary(tmp_path, records)
    rows = {row["lever"]: row for row in summary["rows"]}
    assert rows["plain"]["species"]["mean"] == pytest.approx(0.6)
    assert rows[eval_levers.BASELINE]["margins"] == {}
    for margin in rows["plain"]["margins"].values():
        assert margin["delta"] == pytest.approx(0.1 - 1.0) and margin["high"] < 0
    assert "| plain | one plain centre view" in (tmp_path / "eval_levers.md").read_text()
