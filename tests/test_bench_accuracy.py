"""The accuracy harness (bench/accuracy.py): arms, equivalent command lines, the table, one tiny run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from herbarium import train_cli
from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from herbarium.demo import make_demo_data
from herbarium.evaluation import cli as eval_cli
from herbarium.evaluation.decoding import PathDecoder
from herbarium.evaluation.runner import EvaluationSettings
from herbarium.models import ModelConfig
from herbarium.taxonomy import Taxonomy

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


accuracy = _load_bench()
BUDGET = accuracy.Budget(data="/data/grocery", train_split="train_lt", val_split="val", size=64, epochs=3,
                         batch_size=32, seed=7, workers=2, device="cpu")
OUT = Path("/tmp/bench-out")


@pytest.fixture(scope="module")
def arms():
    return accuracy.build_arms(BUDGET, OUT)


# ------------------------------------------------------------------- arms
def test_every_arm_shares_the_budget(arms):
    assert list(arms) == ["herbarium", "ce", "la"]
    for arm in arms.values():
        cfg = arm.train
        assert (cfg.epochs, cfg.seed, cfg.device) == (3, 7, "cpu")
        assert (cfg.data.data, cfg.data.train_split, cfg.data.val_split) == ("/data/grocery", "train_lt", "val")
        assert (cfg.data.size, cfg.data.batch_size, cfg.data.workers) == (64, 32, 2)
        assert (cfg.model.trunk, cfg.model.pretrained) == ("efficientnet_lite0", True)
        assert cfg.out == str(OUT / arm.name / "run")
        assert (arm.evaluation.seed, arm.evaluation.workers, arm.evaluation.device) == (7, 2, "cpu")


def test_herbarium_arm_keeps_every_library_default(arms):
    arm = arms["herbarium"]
    cfg = arm.train
    assert cfg.loss == LossConfig()
    assert cfg.optim == OptimConfig()
    assert dataclasses.replace(cfg.model, trunk=ModelConfig().trunk, pretrained=ModelConfig().pretrained) == ModelConfig()
    budget_fields = dict(data="/data/grocery", train_split="train_lt", val_split="val", size=64, batch_size=32, workers=2)
    assert cfg.data == DataConfig(**budget_fields, stats=str(OUT / "stats.json"))
    # every setting outside the budget, run folder and stats file is TrainConfig's own default
    chosen = {*accuracy.BUDGET_FIELDS, "out", "device", "data.workers", "data.stats"}
    values, defaults = accuracy.flat_config(cfg), accuracy.flat_config(TrainConfig())
    assert {k: v for k, v in values.items() if k not in chosen} == {k: v for k, v in defaults.items() if k not in chosen}
    assert arm.evaluation == EvaluationSettings(workers=2, seed=7, device="cpu")  # default TTA views and primary
    assert arm.collects_stats


@pytest.mark.parametrize("name, loss", [("ce", "ce"), ("la", "logit_adjusted")])
def test_baselines_train_one_unweighted_species_head_and_skip_tta(arms, name, loss):
    arm = arms[name]
    assert arm.train.loss == LossConfig(levels=("species",), level_weights={"species": 1.0}, loss=loss,
                                        class_weights="none", tau=1.0)
    assert arm.train.data.stats == str(OUT / "imagenet_stats.json")
    assert arm.evaluation.views == ("plain",)
    assert not arm.collects_stats
    # the rest of the recipe (optimizer, schedule, sampler, augmentation, model) is the library's
    assert arm.train.optim == OptimConfig()
    assert (arm.train.data.sampler, arm.train.data.augment) == (DataConfig().sampler, DataConfig().augment)


def test_unknown_arm_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="herbarium"):
        accuracy.build_arms(BUDGET, OUT, names=("herbarium", "focal"))


def test_herbarium_args_change_the_herbarium_arm_as_train_py_would():
    arms = accuracy.build_arms(BUDGET, OUT, herbarium_args=shlex.split("--sampler sqrt --loss logit_adjusted --class-weights none"))
    cfg = arms["herbarium"].train
    assert (cfg.data.sampler, cfg.loss.loss, cfg.loss.class_weights) == ("sqrt", "logit_adjusted", "none")
    assert arms["ce"].train.data.sampler == "none"


@pytest.mark.parametrize("extra", ["--size 32", "--epochs 9", "--trunk resnet50", "--out elsewhere", "--resume x"])
def test_herbarium_args_may_not_change_the_budget(extra):
    with pytest.raises(ValueError):
        accuracy.build_arms(BUDGET, OUT, herbarium_args=shlex.split(extra))


# ---------------------------------------------------------------- commands
@pytest.mark.parametrize("name", ["herbarium", "ce", "la"])
def test_printed_train_command_rebuilds_the_config(arms, name):
    cfg = arms[name].train
    arguments = accuracy.check_train_arguments(cfg)
    assert train_cli.config_from_args(train_cli.build_parser().parse_args(arguments)) == cfg
    assert arguments[0] == "/data/grocery"


@pytest.mark.parametrize("name", ["herbarium", "ce", "la"])
def test_printed_eval_command_rebuilds_the_settings(arms, name):
    settings = arms[name].evaluation
    arguments = accuracy.check_eval_arguments(OUT / name / "run", BUDGET.data, "test", OUT / name / "eval", settings)
    args = eval_cli.build_parser().parse_args(arguments)
    assert eval_cli.settings_from_args(args) == settings
    assert (args.runs, args.data, args.split) == ([str(OUT / name / "run")], "/data/grocery", "test")
    assert ("--views" in arguments) == (name != "herbarium")


def test_a_setting_train_py_cannot_express_is_refused(monkeypatch):
    cfg = TrainConfig(data=DataConfig(data="x"), model=ModelConfig(drop_path=0.1))
    assert "--drop-path" in accuracy.train_arguments(cfg)  # a flag since it got one
    real = accuracy.flat_config
    monkeypatch.setattr(accuracy, "flat_config", lambda config: {**real(config), "model.no_flag": id(config)})
    with pytest.raises(ValueError, match="no_flag"):
        accuracy.train_arguments(cfg)


def test_commands_name_stats_training_and_evaluation(arms):
    herbarium = accuracy.arm_commands(arms["herbarium"], BUDGET, OUT)
    assert herbarium[0].startswith("herbarium collect-stats /data/grocery --split train_lt --size 64")
    assert herbarium[1].startswith("python train.py /data/grocery") and "--levels" not in herbarium[1]
    assert herbarium[2].startswith("python tta_eval.py ")
    ce = accuracy.arm_commands(arms["ce"], BUDGET, OUT)
    assert "--levels species" in ce[1] and "--loss ce" in ce[1] and "--class-weights none" in ce[1]
    assert "--views plain" in ce[2]


# ---------------------------------------------------------------- decoding
def test_consistent_decoding_of_a_lone_species_head_is_its_argmax_and_ancestors():
    taxonomy = Taxonomy.from_categories([
        {"id": 0, "family": "F1", "genus": "G1", "species": "a"},
        {"id": 1, "family": "F1", "genus": "G1", "species": "b"},
        {"id": 2, "family": "F1", "genus": "G2", "species": "c"},
        {"id": 3, "family": "F2", "genus": "G3", "species": "d"},
        {"id": 4, "family": "F2", "genus": "G3", "species": "e"},
    ])
    species_logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    decoded = PathDecoder(taxonomy).predictions({"species": species_logits})
    species = species_logits.argmax(dim=1)
    assert torch.equal(decoded["species"], species)
    assert torch.equal(decoded["genus"], taxonomy.ancestor_map("species", "genus")[species])
    assert torch.equal(decoded["family"], taxonomy.ancestor_map("species", "family")[species])


# ------------------------------------------------------------------- table
def _fake_rank(f1: float, top1: float) -> dict:
    return {"macro_f1": f1, "top1": top1, "top5": None, "shot_thresholds": [5, 20],
            "many_accuracy": top1 + 0.1, "medium_accuracy": top1, "few_accuracy": top1 - 0.1,
            "many_classes": 3, "medium_classes": 3, "few_classes": 3}


def _fake_result(arm: str, species: float, genus: float, family: float) -> dict:
    metrics = {"family": _fake_rank(family, 0.9), "genus": _fake_rank(genus, 0.6), "species": _fake_rank(species, 0.4)}
    return {"arm": arm, "variant": "tta_consistent", "metrics": metrics, "variants": {"tta_consistent": metrics},
            "seconds": {"stats": 0.0, "train": 90.0, "evaluate": 30.0, "total": 120.0}, "hardware": "CPU",
            "date": "2024-01-01T00:00:00", "budget": dataclasses.asdict(BUDGET), "commands": [f"python train.py # {arm}"]}


def test_comparison_table_rows_columns_and_margins():
    results = {"herbarium": _fake_result("herbarium", 0.50, 0.70, 0.90),
               "ce": _fake_result("ce", 0.30, 0.60, 0.85), "la": _fake_result("la", 0.40, 0.65, 0.80)}
    table = accuracy.comparison_table(results)
    assert table["ranks"] == ["species", "genus", "family"]
    assert table["columns"] == ["species macro-F1", "species top-1", "genus macro-F1", "genus top-1",
                                "family macro-F1", "family top-1", "species many-shot acc",
                                "species medium-shot acc", "species few-shot acc"]
    assert [row["arm"] for row in table["rows"]] == ["herbarium", "ce", "la"]
    la = table["rows"][2]
    assert (la["species macro-F1"], la["genus top-1"], la["species few-shot acc"]) == (0.40, 0.6, 0.4 - 0.1)
    assert la["wall_minutes"] == 2.0
    assert table["margins"]["species"] == pytest.approx({"vs_ce": 0.20, "vs_la": 0.10, "vs_better_baseline": 0.10})
    assert table["margins"]["family"] == pytest.approx({"vs_ce": 0.05, "vs_la": 0.10, "vs_better_baseline": 0.05})
    markdown = accuracy.render_markdown(table, results)
    assert "| herbarium | tta_consistent | 0.500 | 0.400 | 0.700 |" in markdown
    assert "few < 5 <= medium <= 20 < many" in markdown
    assert "python train.py # la" in markdown


@pytest.mark.parametrize("arms", [("ce",), ("herbarium",)])
def test_table_without_both_sides_has_no_margins(arms):
    results = {name: _fake_result(name, 0.3, 0.6, 0.85) for name in arms}
    table = accuracy.comparison_table(results)
    assert table["margins"] == {} and len(table["rows"]) == 1
    assert "margin" not in accuracy.render_markdown(table, results)


# ------------------------------------------------------------- end to end
def test_tiny_run_on_demo_data_writes_json_and_markdown(tmp_path):
    data = tmp_path / "demo"
    make_demo_data(data, image_size=32, max_per_class=6, min_per_class=2, test_per_class=1, num_families=2,
                   genera_per_family=2, species_per_genus=2)
    out = tmp_path / "bench"
    assert accuracy.main([
        "--data", str(data), "--train-split", "train", "--val-split", "none", "--trunk", "resnet10t", "--no-pretrained",
        "--size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--out", str(out),
    ]) == 0
    document = json.loads((out / "comparison.json").read_text())
    assert [row["arm"] for row in document["table"]["rows"]] == ["herbarium", "ce", "la"]
    for name in ("ce", "la"):  # one species head: genus and family come from decoding its prediction
        variants = document["results"][name]["variants"]
        assert set(variants) == {"tta_heads", "tta_consistent"}
        assert set(variants["tta_heads"]) == {"species"}
        assert set(variants["tta_consistent"]) == {"family", "genus", "species"}
        assert variants["tta_heads"]["species"] == variants["tta_consistent"]["species"]
    markdown = (out / "comparison.md").read_text()
    assert "| herbarium |" in markdown and "| la |" in markdown and "python tta_eval.py" in markdown
