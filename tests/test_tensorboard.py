"""What TensorBoard shows of a run: hparams with or without validation, in a useful order, and losses that overlay."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fixtures import tiny_train_config
from herbarium import engine
from herbarium.demo import make_demo_data
from herbarium.tensorboard_hparams import LEADING


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tb") / "demo"
    make_demo_data(out, seed=0, image_size=32, max_per_class=4, min_per_class=2, test_per_class=2)
    return out


def _events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    events.Reload()
    return events


def _hparam_names(events: EventAccumulator) -> list[str]:
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    return list(data.session_start_info.hparams)


def test_a_run_without_validation_gets_hparams_against_its_training_loss(demo, tmp_path):
    cfg = tiny_train_config(demo, tmp_path / "run", epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_split=None, holdout=0.0))
    engine.train(cfg, quiet=True)
    events = _events(tmp_path / "run")
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert events.Scalars("hparam/final_train_loss")[0].value == pytest.approx(record["loss"], rel=1e-5)
    names = _hparam_names(events)
    # TensorBoard sorts them by name: the settings that matter come first, in this order
    assert sorted(names)[:len(LEADING)] == [f"{number:02d} {name}" for number, name in enumerate(LEADING, start=1)]
    assert "01 trunk" in names and "model.trunk" in names and "environment" not in names
    assert events.Scalars("loss/train")[0].value == pytest.approx(record["loss"], rel=1e-5)
    assert "loss/val" not in events.Tags()["scalars"]


def test_train_and_validation_losses_share_a_section_and_step(demo, tmp_path):
    cfg = tiny_train_config(demo, tmp_path / "run", epochs=2)  # validated on the test split
    engine.train(cfg, quiet=True)
    events = _events(tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train, val = events.Scalars("loss/train"), events.Scalars("loss/val")
    assert [e.step for e in train] == [e.step for e in val] and len(val) == 2
    expected = sum(records[-1]["val"][rank]["loss"] for rank in ("species", "genus", "family"))  # rank weights 1
    assert val[-1].value == pytest.approx(expected, rel=1e-5)
    assert events.Scalars("loss/val_species")[-1].value == pytest.approx(records[-1]["val"]["species"]["loss"], rel=1e-5)
    assert "custom_scalars__config__" in events.Tags()["tensors"]  # the overlay chart
    assert events.Scalars("hparam/best_epoch") and events.Scalars("hparam/final_train_loss")
