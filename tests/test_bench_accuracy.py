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
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.models import ModelConfig
from herbarium.provenance import package_versions
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
                         seed=7, workers=2, device="cpu")
OUT = Path("/tmp/bench-out")


@pytest.fixture(scope="module")
def arms():
    return accuracy.build_arms(BUDGET, OUT)


# ------------------------------------------------------------------- arms
def test_every_arm_shares_the_budget(arms):
    assert list(arms) == ["stock_ce", "stock_la", "herbarium", "herbarium2020"]
    for name in ("herbarium", "herbarium2020"):
        cfg = arms[name].train
        assert (cfg.epochs, cfg.seed, cfg.device) == (3, 7, "cpu")
        assert (cfg.data.data, cfg.data.train_split, cfg.data.val_split) == ("/data/grocery", "train_lt", "val")
        assert (cfg.data.size, cfg.data.workers) == (64, 2)
        assert (cfg.model.trunk, cfg.model.pretrained) == ("efficientnet_lite0", True)
        assert cfg.out == str(OUT / name / "run")
        assert (arms[name].evaluation.seed, arms[name].evaluation.workers, arms[name].evaluation.device) == (7, 2, "cpu")
    for name, loss in (("stock_ce", "ce"), ("stock_la", "la")):
        recipe = arms[name].stock
        assert (recipe.size, recipe.epochs, recipe.seed, recipe.workers, recipe.loss) == (64, 3, 7, 2, loss)
        assert (recipe.batch_size, recipe.lr, recipe.weight_decay) == (64, 1e-3, 0.05)  # the budget batch; lr and wd the recipe's own


def test_every_arm_trains_at_the_budget_batch_size():
    budget = dataclasses.replace(BUDGET, batch_size=48)
    arms = accuracy.build_arms(budget, OUT)
    assert {arms[name].train.data.batch_size for name in ("herbarium", "herbarium2020")} == {48}
    assert {arms[name].train.optim.accum_steps for name in ("herbarium", "herbarium2020")} == {1}
    assert {arms[name].stock.batch_size for name in ("stock_ce", "stock_la")} == {48}
    assert "--batch-size 48" in accuracy.arm_commands(arms["stock_la"], budget)[0]
    assert accuracy.Budget().batch_size == DataConfig().batch_size  # herbarium's own default unless given


def test_herbarium_arm_keeps_every_library_default(arms):
    cfg = arms["herbarium"].train
    chosen = {*accuracy.BUDGET_FIELDS, "out", "device", "data.workers"}
    values, defaults = accuracy.flat_config(cfg), accuracy.flat_config(TrainConfig())
    assert {k: v for k, v in values.items() if k not in chosen} == {k: v for k, v in defaults.items() if k not in chosen}
    assert arms["herbarium"].evaluation == EvaluationSettings(workers=2, seed=7, device="cpu")  # default views and primary


def test_herbarium2020_arm_is_the_named_recipe(arms):
    cfg = arms["herbarium2020"].train
    assert cfg.recipe == "herbarium2020"
    assert (cfg.optim.optim, cfg.optim.schedule, cfg.loss.loss, cfg.loss.class_weights) == ("adam:0", "step:5", "focal", "effective")
    assert cfg.loss.level_weights == {"species": 1.5} and cfg.model.dropout == 0.5


def test_stock_arms_need_the_packaged_lite0_weights():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        accuracy.build_arms(dataclasses.replace(BUDGET, trunk="resnet50"), OUT)
    assert list(accuracy.build_arms(dataclasses.replace(BUDGET, trunk="resnet50"), OUT, names=("herbarium",))) == ["herbarium"]


def test_unknown_arm_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="herbarium"):
        accuracy.build_arms(BUDGET, OUT, names=("herbarium", "focal"))


def test_herbarium_args_change_the_herbarium_arms_as_train_py_would():
    arms = accuracy.build_arms(BUDGET, OUT, herbarium_args=shlex.split("--sampler sqrt --loss focal --class-weights effective"))
    for name in ("herbarium", "herbarium2020"):
        cfg = arms[name].train
        assert (cfg.data.sampler, cfg.loss.loss, cfg.loss.class_weights) == ("sqrt", "focal", "effective")


@pytest.mark.parametrize("extra", ["--size 32", "--epochs 9", "--trunk resnet50", "--out elsewhere", "--resume x",
                                   "--batch-size 32", "--accum-steps 2"])
def test_herbarium_args_may_not_change_the_budget(extra):
    with pytest.raises(ValueError):
        accuracy.build_arms(BUDGET, OUT, herbarium_args=shlex.split(extra))


# ---------------------------------------------------------------- commands
def test_commands_are_the_argument_lists_the_arms_run(arms):
    train, evaluate = accuracy.arm_commands(arms["herbarium"], BUDGET)
    assert train == "python train.py " + shlex.join(arms["herbarium"].train_args)
    assert train.startswith("python train.py /data/grocery --train-split train_lt") and "--recipe" not in train
    assert evaluate.startswith(f"python tta_eval.py {OUT / 'herbarium' / 'run'} --data /data/grocery --split test")
    assert "--recipe herbarium2020" in accuracy.arm_commands(arms["herbarium2020"], BUDGET)[0]
    (stock_command,) = accuracy.arm_commands(arms["stock_la"], BUDGET)
    assert stock_command.startswith("python bench/stock.py --data /data/grocery --train-split train_lt --test-split test --loss la")


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
    return {"arm": arm, "variant": "tta_heads", "metrics": metrics, "variants": {"tta_heads": metrics},
            "seconds": {"train": 90.0, "evaluate": 30.0, "total": 120.0}, "hardware": "CPU",
            "batch_size": 64, "optimizer_steps": 540,
            "date": "2024-01-01T00:00:00", "budget": dataclasses.asdict(BUDGET), "commands": [f"python train.py # {arm}"]}


def test_comparison_table_rows_columns_and_margins():
    results = {"stock_ce": _fake_result("stock_ce", 0.30, 0.60, 0.85), "stock_la": _fake_result("stock_la", 0.40, 0.65, 0.80),
               "herbarium": _fake_result("herbarium", 0.50, 0.70, 0.90)}
    table = accuracy.comparison_table(results)
    assert table["ranks"] == ["species", "genus", "family"]
    assert table["columns"] == ["species macro-F1", "species top-1", "genus macro-F1", "genus top-1",
                                "family macro-F1", "family top-1", "species many-shot acc",
                                "species medium-shot acc", "species few-shot acc"]
    assert [row["arm"] for row in table["rows"]] == ["stock_ce", "stock_la", "herbarium"]
    la = table["rows"][1]
    assert (la["species macro-F1"], la["genus top-1"], la["species few-shot acc"]) == (0.40, 0.6, 0.4 - 0.1)
    assert la["wall_minutes"] == 2.0
    assert set(table["margins"]) == {"herbarium - stock_ce", "herbarium - stock_la"}
    assert table["margins"]["herbarium - stock_la"] == pytest.approx({"species": 0.10, "genus": 0.05, "family": 0.10})
    markdown = accuracy.render_markdown(table, results)
    assert "| herbarium | tta_heads | 64 | 540 | 0.500 | 0.400 | 0.700 |" in markdown
    assert "few < 5 <= medium <= 20 < many" in markdown
    assert "python train.py # stock_la" in markdown


@pytest.mark.parametrize("arms", [("stock_ce",), ("herbarium",)])
def test_table_without_both_sides_has_no_margins(arms):
    results = {name: _fake_result(name, 0.3, 0.6, 0.85) for name in arms}
    table = accuracy.comparison_table(results)
    assert table["margins"] == {} and len(table["rows"]) == 1
    assert "margins" not in accuracy.render_markdown(table, results)


# ------------------------------------------------------------- end to end
def test_tiny_run_on_demo_data_writes_json_and_markdown(tmp_path):
    data = tmp_path / "demo"
    make_demo_data(data, image_size=32, max_per_class=6, min_per_class=2, test_per_class=1, num_families=2,
                   genera_per_family=2, species_per_genus=2)
    out = tmp_path / "bench"
    assert accuracy.main([
        "--data", str(data), "--train-split", "train", "--val-split", "none", "--size", "32", "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--out", str(out), "--only", "stock_la,herbarium",
    ]) == 0
    document = json.loads((out / "comparison.json").read_text())
    assert [row["arm"] for row in document["table"]["rows"]] == ["stock_la", "herbarium"]
    stock_species = document["results"]["stock_la"]["metrics"]["species"]
    assert 0.0 <= stock_species["macro_f1"] <= 1.0 and stock_species["few_classes"] >= 1
    steps = {row["arm"]: (row["batch"], row["steps"]) for row in document["table"]["rows"]}
    assert steps["stock_la"] == steps["herbarium"] and steps["herbarium"][1] >= 1  # same batch, same optimizer steps
    interval = document["table"]["margins"]["herbarium - stock_la"]["finest_interval"]
    assert interval["low"] <= interval["delta"] <= interval["high"]
    herbarium = document["results"]["herbarium"]
    assert herbarium["packages"] == package_versions()
    assert herbarium["primary_choice"]["reason"].startswith("the run has no labelled validation split")
    markdown = (out / "comparison.md").read_text()
    assert "| herbarium |" in markdown and "| stock_la |" in markdown and "python bench/stock.py" in markdown


def test_seed_summary_gives_mean_spread_and_margins_per_seed(tmp_path):
    for seed, (herbarium, stock_la) in {0: (0.50, 0.40), 1: (0.60, 0.45), 2: (0.55, 0.41)}.items():
        for arm, species in (("stock_la", stock_la), ("herbarium", herbarium)):
            paths = accuracy.ArmPaths(tmp_path / f"s{seed}" / arm)
            paths.root.mkdir(parents=True)
            paths.result.write_text(json.dumps(_fake_result(arm, species, 0.7, 0.9)))
    summary = accuracy.write_seed_summary(tmp_path)
    rows = {row["arm"]: row for row in summary["rows"]}
    assert rows["herbarium"]["seeds"] == [0, 1, 2]
    assert rows["herbarium"]["species"]["mean"] == pytest.approx(0.55)
    assert rows["herbarium"]["species"]["std"] == pytest.approx(0.05)
    assert rows["stock_la"]["species"]["per_seed"] == [0.40, 0.45, 0.41]
    assert [summary["margins"][seed]["herbarium - stock_la"]["species"] for seed in (0, 1, 2)] == \
        pytest.approx([0.10, 0.15, 0.14])
    markdown = (tmp_path / "seeds.md").read_text()
    assert "| herbarium | 0,1,2 | 64 | 540 | 0.550 ± 0.050 |" in markdown


def test_a_kept_result_from_other_package_versions_is_named_when_skipped(tmp_path):
    arm = tmp_path / "stock_la"
    accuracy.ArmPaths(arm).root.mkdir()
    record = _fake_result("stock_la", 0.4, 0.5, 0.9)
    for packages, caveat in ((package_versions(), ""),
                             ({**package_versions(), "timm": "0.0.1"}, f"(timm 0.0.1 -> {package_versions()['timm']})"),
                             (None, "recorded no package versions")):
        accuracy.ArmPaths(arm).result.write_text(json.dumps({**record, "packages": packages}))
        assert caveat in accuracy.kept_result_caveat(arm) and bool(caveat) == bool(accuracy.kept_result_caveat(arm))
