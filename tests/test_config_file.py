"""Tests for herbarium/config_file.py: ``train.py --config FILE`` and what a run's config.json records."""

from __future__ import annotations

import json

import PIL
import pytest
import torchvision

from herbarium.errors import UsageError
from herbarium.train_cli import build_parser, config_from_args, main, parse_train_args
from tests.fixtures import write_herbarium2020


def _config(*argv: str):
    return config_from_args(parse_train_args(build_parser(), list(argv)))


def test_a_yaml_file_gives_defaults_and_flags_win(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("trunk: resnet10t\nbatch-size: 8\nlevels: [species, genus]\nrank_weights: {species: 1.5}\n"
                    "sampler: sqrt\nepochs: 3\n")
    cfg = _config("DATA", "--config", str(path), "--epochs", "5")
    assert (cfg.model.trunk, cfg.data.batch_size, cfg.loss.levels) == ("resnet10t", 8, ("species", "genus"))
    assert (cfg.loss.level_weights, cfg.data.sampler, cfg.epochs) == ({"species": 1.5}, "sqrt", 5)


def test_text_values_parse_as_on_the_command_line(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"levels": "species,genus", "rank-weights": "species=2"}))
    cfg = _config("DATA", "--config", str(path))
    assert (cfg.loss.levels, cfg.loss.level_weights) == (("species", "genus"), {"species": 2.0})


def test_a_file_recipe_moves_defaults_and_the_file_wins_over_it(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("recipe: herbarium2020\ndropout: 0.3\n")
    cfg = _config("DATA", "--config", str(path))
    assert (cfg.recipe, cfg.optim.optim, cfg.model.dropout) == ("herbarium2020", "adam:0", 0.3)
    assert _config("DATA", "--config", str(path), "--recipe", "default").optim.optim == "adamw:0"


@pytest.mark.parametrize(("text", "message"), [
    ("batchsize: 8\n", "'batchsize' is no option"),
    ("sampler: often\n", "sampler: 'often' is not one of"),
    ("batch-size: many\n", "batch-size: invalid int value"),
    ("- trunk\n", "expected a mapping"),
    ("trunk: [unclosed\n", "not valid YAML"),
])
def test_a_bad_file_names_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as caught:
        _config("DATA", "--config", str(path))
    assert str(path) in str(caught.value)


def test_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read it"):
        _config("DATA", "--config", str(tmp_path / "nope.yaml"))


def test_a_runs_config_json_replays_the_run_and_records_its_environment(tmp_path, capsys):
    data = tmp_path / "data"
    write_herbarium2020(data)
    argv = [str(data), "--no-pretrained", "--trunk", "resnet10t", "--size", "32", "--batch-size", "4", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--levels", "species,genus", "--rank-weights", "species=1.5",
            "--sampler", "sqrt", "--optim", "adam@2e-3:0", "--quiet", "--out", str(tmp_path / "x")]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "x" / "config.json").read_text())
    environment = saved["environment"]
    assert environment["command"].endswith(" ".join(argv[-2:])) and "--rank-weights species=1.5" in environment["command"]
    assert {"herbarium", "torch", "torchvision", "timm", "pillow", "numpy", "python", "platform"} <= set(environment)
    assert environment["pillow"] == PIL.__version__ and environment["torchvision"] == torchvision.__version__
    assert (environment["devices"], environment["world_size"]) == (["cpu"], 1)

    replayed = _config("--config", str(tmp_path / "x" / "config.json"), "--out", str(tmp_path / "y"))
    first = _config(*argv)
    assert replayed.out == str(tmp_path / "y")
    assert {**replayed.to_dict(), "out": first.out} == first.to_dict()


def test_config_is_refused_with_resume(tmp_path):
    from herbarium.train_cli import run_config

    parser = build_parser()
    argv = ["--resume", str(tmp_path), "--config", str(tmp_path / "x.yaml")]
    (tmp_path / "x.yaml").write_text("epochs: 3\n")
    with pytest.raises(UsageError, match="--resume continues with the run's own config; drop --config"):
        run_config(parser, parse_train_args(parser, argv), argv)
