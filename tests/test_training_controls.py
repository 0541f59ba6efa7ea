"""What timm and Lightning users reach for: ``--early-stop``, ``summary.csv`` and ``--deterministic``."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fixtures import tiny_train_config
from herbarium import engine
from herbarium.checkpoint import load_checkpoint
from herbarium.config import OptimConfig
from herbarium.demo import make_demo_data
from herbarium.errors import UsageError
from herbarium.train_cli import build_parser, config_from_args, parse_train_args


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("controls") / "demo"
    make_demo_data(out, seed=0, image_size=32, max_per_class=4, min_per_class=2, test_per_class=2)
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_early_stop_ends_after_patience_epochs_without_gain_and_keeps_the_best(demo, tmp_path, capsys):
    # An LR of 1e-12 leaves the model as it started: the score cannot improve after the first epoch.
    cfg = tiny_train_config(demo, tmp_path / "run", epochs=6, early_stop=2,
                            optim=OptimConfig(optim="adam@1e-12:0", schedule="constant"))
    engine.train(cfg, quiet=True)
    records = _records(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2, 3]  # epoch 1 sets the best, 2 and 3 do not improve on it
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["run"]["epoch"] == 1
    assert "early stop after epoch 3: no better species macro-F1 for 2 epoch(s) (--early-stop 2)" in capsys.readouterr().out


def test_early_stop_needs_validation(demo, tmp_path):
    cfg = tiny_train_config(demo, tmp_path / "run", early_stop=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_split=None, holdout=0.0))
    with pytest.raises(UsageError, match="--early-stop stops on the validation macro-F1"):
        engine.Trainer(cfg)


def test_summary_csv_has_one_flat_row_per_epoch_beside_the_log(demo, tmp_path):
    run = tmp_path / "run"
    engine.train(tiny_train_config(demo, run, epochs=2), quiet=True)
    rows = list(csv.DictReader((run / "summary.csv").open()))
    records = _records(run)
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    header = list(rows[0])
    assert header[:2] == ["epoch", "train_loss"] and {"lr", "optimizer", "images_per_s"} <= set(header)
    for row, record in zip(rows, records):
        assert float(row["train_loss"]) == pytest.approx(record["loss"])
        assert float(row["train_loss_species"]) == pytest.approx(record["loss_terms"]["species"])
        assert float(row["val_species_macro_f1"]) == pytest.approx(record["val"]["species"]["macro_f1"])
        assert float(row["val_family_top1"]) == pytest.approx(record["val"]["family"]["top1"])


def test_deterministic_is_an_option_and_turns_deterministic_algorithms_on(demo, tmp_path):
    parsed = config_from_args(parse_train_args(build_parser(), ["DATA", "--deterministic", "--early-stop", "3"]))
    assert (parsed.deterministic, parsed.early_stop) == (True, 3)
    assert config_from_args(parse_train_args(build_parser(), ["DATA"])).deterministic is False
    try:
        engine.train(tiny_train_config(demo, tmp_path / "run", epochs=1, deterministic=True), quiet=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert json.loads((tmp_path / "run" / "config.json").read_text())["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(False)
