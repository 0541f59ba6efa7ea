"""Tests for herbarium/options.py and the options generated from the config dataclasses.

A setting is written once, as a dataclass field with its help; the flag, its
parsing, its choices and the default its help states all come from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from dataclasses import dataclass

import pytest

from herbarium.config import NAN_POLICIES, PRECISIONS, DataConfig, LossConfig, O2UConfig, OptimConfig, TrainConfig
from herbarium.data.augment import PRESETS
from herbarium.data.gpu import DECODES
from herbarium.data.samplers import SAMPLERS
from herbarium.demo import make_demo_data
from herbarium.data.readers import read_split
from herbarium.engine import build_run_loss
from herbarium.errors import ConfigError
from herbarium.evaluation import cli as eval_cli
from herbarium.evaluation.combine import AVERAGING_MODES
from herbarium.evaluation.decoding import VARIANTS
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.losses import CLASS_WEIGHTS
from herbarium.models import HEADS, POOLS, ModelConfig
from herbarium.noisy.o2u import O2U_WEIGHTINGS
from herbarium.options import add_options, dest_of, format_default, option, option_fields, spec_of, values_from_namespace
from herbarium.recipes import RECIPES
from herbarium.retrieval import RETRIEVAL_MODES
from herbarium.stats import build_parser as stats_parser
from herbarium.train_cli import (
    NOT_OPTIONS, PREFIXES, build_parser, config_from_args, given_options, parse_train_args, settings_given,
    warn_unread_loss_settings,
)

TRAIN_SECTIONS = [(TrainConfig, ""), (DataConfig, ""), (ModelConfig, ""), (LossConfig, ""), (OptimConfig, ""),
                  (O2UConfig, PREFIXES["o2u"])]


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _parsed(*argv: str) -> TrainConfig:
    return config_from_args(parse_train_args(build_parser(), ["DATA", *argv]))


# ------------------------------------------------------- every field, one flag
@pytest.mark.parametrize(("config_cls", "prefix"), TRAIN_SECTIONS, ids=lambda value: getattr(value, "__name__", value))
def test_every_train_setting_has_exactly_one_option_or_is_exempt(config_cls, prefix):
    actions = build_parser()._actions
    exempt = NOT_OPTIONS.get(config_cls, ())
    for field in dataclasses.fields(config_cls):
        if field.name in exempt:  # a nested section, the record of resume changes, or the positional DATA
            assert spec_of(field) is None, field.name
            continue
        assert len([action for action in actions if action.dest == dest_of(field, prefix)]) == 1, field.name


def test_every_evaluation_setting_has_exactly_one_option():
    actions = eval_cli.build_parser()._actions
    for field in dataclasses.fields(EvaluationSettings):
        assert len([action for action in actions if action.dest == dest_of(field)]) == 1, field.name


def test_an_empty_command_line_gives_the_dataclass_defaults():
    assert _parsed() == TrainConfig(data=DataConfig(data="DATA"))
    settings = eval_cli.settings_from_args(eval_cli.build_parser().parse_args(["RUN", "--data", "DATA"]))
    assert settings == EvaluationSettings()


@pytest.mark.parametrize("parser", [build_parser(), eval_cli.build_parser()], ids=["train", "evaluate"])
def test_every_option_help_states_its_default(parser):
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version") and not action.required:
            assert "(default: " in action.help, action.dest


def test_generated_help_states_the_field_default():
    actions = _actions(build_parser())
    for config_cls, prefix in TRAIN_SECTIONS:
        for field in option_fields(config_cls):
            spec = field.metadata["herbarium.option"]
            stated = spec.default_text if spec.default_text is not None else format_default(
                field.default if field.default is not dataclasses.MISSING else field.default_factory())
            flag = next(flag for flag, action in actions.items() if action.dest == dest_of(field, prefix))
            assert actions[flag].help.endswith(f"(default: {stated.replace('%', '%%')})"), flag


def test_existing_flags_aliases_and_dests_stay():
    actions = _actions(build_parser())
    expected = {"--rank-weights": "level_weights", "--level-weights": "level_weights", "--weights": "weights",
                "--trunk-weights": "weights", "--no-channels-last": "channels_last", "--o2u": "o2u",
                "--o2u-floor": "o2u_floor", "--o2u-warmup-cycles": "o2u_warmup_cycles", "--data": "data_option",
                "--lr": "lr", "--warmup-epochs": "warmup_epochs", "--min-lr": "min_lr", "--resume": "resume",
                "--resume-if-exists": "resume_if_exists", "--overwrite": "overwrite", "--quiet": "quiet",
                "--sce-alpha": "sce_alpha", "--sce-beta": "sce_beta"}
    assert {flag: actions[flag].dest for flag in expected} == expected
    assert "--channels-last" not in actions
    assert _actions(eval_cli.build_parser())["--class-weighted-ensemble"].dest == "class_weighted"


def test_choices_come_from_their_owners():
    train, evaluate = _actions(build_parser()), _actions(eval_cli.build_parser())
    owners = {"--sampler": SAMPLERS, "--augment": tuple(sorted(PRESETS)), "--decode": DECODES, "--head": tuple(HEADS),
              "--pool": tuple(POOLS), "--class-weights": CLASS_WEIGHTS, "--precision": PRECISIONS,
              "--nan-policy": NAN_POLICIES, "--o2u-weighting": O2U_WEIGHTINGS, "--recipe": tuple(RECIPES)}
    assert {flag: tuple(train[flag].choices) for flag in owners} == owners
    owners = {"--average": AVERAGING_MODES, "--retrieval-mode": RETRIEVAL_MODES, "--primary": VARIANTS,
              "--decode": DECODES, "--precision": PRECISIONS}
    assert {flag: tuple(evaluate[flag].choices) for flag in owners} == owners
    assert tuple(_actions(stats_parser())["--decode"].choices) == DECODES
    assert train["--loss"].choices is None  # also takes species=focal,genus=ce: checked by LossConfig.loss_by_rank


def test_values_parse_by_field_type():
    cfg = _parsed("--ranks", "order,family", "--rank-weights", "species=1.5,genus=1", "--no-channels-last", "--o2u",
                  "--o2u-floor", "0.3", "--workers", "2", "--weight-decay", "0.01", "--arcface-levels", "species")
    assert cfg.data.ranks == ("order", "family") and cfg.loss.level_weights == {"species": 1.5, "genus": 1.0}
    assert cfg.channels_last is False and cfg.o2u.enabled is True and cfg.o2u.floor == 0.3
    assert cfg.data.workers == 2 and cfg.optim.weight_decay == 0.01 and cfg.model.arcface_levels == ("species",)
    args = eval_cli.build_parser().parse_args(["RUN", "--data", "D", "--views", "2", "--shot-thresholds", "5,50",
                                               "--model-weights", "1,3", "--retrieval-levels", "species,genus"])
    settings = eval_cli.settings_from_args(args)
    assert settings.views == ("train", "plain") and settings.shot_thresholds == (5, 50)
    assert settings.model_weights == (1.0, 3.0) and settings.retrieval_levels == ("species", "genus")


@pytest.mark.parametrize("argv", [["--rank-weights", "species"], ["--shot-thresholds", "5"], ["--views", "nonsense"]])
def test_a_bad_value_names_its_option(argv, capsys):
    parser = eval_cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["RUN", "--data", "D", *argv])
    assert f"argument {argv[0]}: " in capsys.readouterr().err


def test_recipes_move_defaults_and_explicit_flags_win():
    card = _parsed("--recipe", "herbarium2020")
    assert (card.loss.loss, card.loss.class_weights, card.optim.optim, card.model.dropout) == ("focal", "effective", "adam:0", 0.5)
    assert card.loss.level_weights == {"species": 1.5} and card.data.holdout == 0.1
    assert _parsed("--recipe", "herbarium2020", "--loss", "ce", "--dropout", "0.1").loss.loss == "ce"
    assert _parsed("--recipe", "herbarium2020", "--dropout", "0.1").model.dropout == 0.1


# --------------------------------------------------------- a new setting
@dataclass
class _Throwaway:
    size: int = option(3, "a size")
    names: tuple[str, ...] = option(("a", "b"), "some names")
    mode: str = option("x", "a mode", choices=("x", "y"))
    ratio: float | None = option(None, "a ratio", default_text="unset")
    fast: bool = option(False, "go fast")
    tidy: bool = option(True, "tidy up", negate="--no-tidy")
    weights: dict[str, float] = option(help="weights", default_factory=dict, flag="--w")
    internal: str = "kept"  # no option: must be skipped explicitly


def test_a_field_declared_with_option_becomes_a_flag():
    parser = argparse.ArgumentParser()
    add_options(parser, _Throwaway, prefix="t_", skip=("internal",))
    actions = _actions(parser)
    assert set(actions) == {"-h", "--help", "--t-size", "--t-names", "--t-mode", "--t-ratio", "--t-fast", "--no-tidy", "--w"}
    assert actions["--t-size"].help == "a size (default: 3)" and actions["--t-ratio"].help == "a ratio (default: unset)"
    assert actions["--t-names"].help == "some names (default: a,b)" and actions["--t-fast"].help == "go fast (default: off)"
    assert values_from_namespace(_Throwaway, parser.parse_args([]), "t_") == _Throwaway()
    args = parser.parse_args(["--t-size", "5", "--t-names", "c", "--t-mode", "y", "--t-ratio", "0.5", "--t-fast",
                              "--no-tidy", "--w", "k=2"])
    assert values_from_namespace(_Throwaway, args, "t_", internal="given") == _Throwaway(
        5, ("c",), "y", 0.5, True, False, {"k": 2.0}, "given")


def test_a_field_without_option_must_be_skipped():
    with pytest.raises(TypeError, match="internal"):
        add_options(argparse.ArgumentParser(), _Throwaway)
    with pytest.raises(TypeError, match="no field"):
        add_options(argparse.ArgumentParser(), _Throwaway, skip=("internal", "nonsense"))


# ------------------------------------------------------ symmetric cross-entropy
def test_sce_settings_reach_the_loss(tmp_path):
    make_demo_data(tmp_path / "demo", image_size=16, max_per_class=3, min_per_class=2, test_per_class=1)
    cfg = _parsed("--loss", "sce", "--sce-alpha", "0.5", "--sce-beta", "2")
    assert (cfg.loss.sce_alpha, cfg.loss.sce_beta) == (0.5, 2.0)
    loss = build_run_loss(cfg, read_split(tmp_path / "demo", "train"))
    assert {(module.alpha, module.beta) for module in loss.losses.values()} == {(0.5, 2.0)}
    default = build_run_loss(_parsed("--loss", "sce"), read_split(tmp_path / "demo", "train"))
    assert {(module.alpha, module.beta) for module in default.losses.values()} == {(0.1, 1.0)}


# ------------------------------------------------- loss settings no loss reads
@pytest.mark.parametrize(("argv", "unread"), [
    (["--gamma", "3"], ["--gamma 3.0"]),
    (["--smoothing", "0", "--beta", "0.9"], ["--smoothing 0.0", "--beta 0.9"]),
    (["--loss", "focal", "--gamma", "3"], []),
    (["--loss", "species=label_smoothing,genus=ce,family=ce", "--smoothing", "0.2", "--class-weights", "effective",
      "--beta", "0.9"], []),
    (["--tau", "1.0"], []),
])
def test_a_loss_setting_no_loss_reads_is_warned_about_by_name(argv, unread):
    parser = build_parser()
    argv = ["DATA", *argv]
    cfg = config_from_args(parse_train_args(parser, argv))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unread_loss_settings(cfg, given_options(parser, argv), parser)
    messages = [str(warning.message) for warning in caught]
    assert [message.split(" changes nothing")[0] for message in messages] == unread
    assert all("--loss" in message for message in messages)


def _unread_warnings(argv: list[str]) -> list[str]:
    parser = build_parser()
    args = parse_train_args(parser, argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unread_loss_settings(config_from_args(args), settings_given(parser, args, argv), parser)
    return [str(warning.message).split(" changes nothing")[0] for warning in caught]


def test_a_config_file_setting_no_loss_reads_is_warned_about_but_a_replayed_run_is_not(tmp_path):
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"loss": {"gamma": 3.0}}))
    assert _unread_warnings(["DATA", "--config", str(own)]) == ["--gamma 3.0"]
    replay = tmp_path / "config.json"  # a run's saved config names every setting, at its default here
    replay.write_text(json.dumps(TrainConfig(data=DataConfig(data="DATA")).to_dict()))
    assert _unread_warnings(["DATA", "--config", str(replay)]) == []
    assert _unread_warnings(["DATA", "--config", str(replay), "--tau", "1.5", "--smoothing", "0.2"]) == ["--smoothing 0.2"]


def test_only_the_first_process_of_a_torchrun_job_warns(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert _unread_warnings(["DATA", "--gamma", "3"]) == []
    monkeypatch.setenv("RANK", "0")
    assert _unread_warnings(["DATA", "--gamma", "3"]) == ["--gamma 3.0"]


# ------------------------------------------------------------ saved configs
def test_an_unknown_saved_setting_is_an_error_naming_it_and_the_file(tmp_path):
    saved = TrainConfig(data=DataConfig(data="D")).to_dict()
    saved["data"]["foo"] = 1
    with pytest.raises(ConfigError, match=r"unknown setting 'data\.foo'"):
        TrainConfig.from_dict(saved)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TrainConfig().to_dict(), "bar": 2}))
    with pytest.raises(ConfigError, match=rf"^{path}: unknown setting 'bar'"):
        TrainConfig.load(path)
    with pytest.raises(ConfigError, match=r"unknown setting 'model\.num_classes'.*valid keys"):
        ModelConfig.from_dict({"num_classes": 3})


def test_missing_saved_settings_take_defaults_and_lists_become_tuples():
    saved = TrainConfig(data=DataConfig(data="D", ranks=("genus", "species"))).to_dict()
    del saved["loss"]["sce_alpha"], saved["snapshots"], saved["o2u"]
    loaded = TrainConfig.from_dict(json.loads(json.dumps(saved)))
    assert loaded == TrainConfig(data=DataConfig(data="D", ranks=("genus", "species")))
    assert isinstance(loaded.data.ranks, tuple) and isinstance(loaded.loss.levels, tuple)


@dataclass
class Ranged:
    count: int = option(1, "a count", minimum=1)
    fraction: float = option(0.5, "a fraction", minimum=0, maximum=1)


@pytest.mark.parametrize("argv, problem", [
    (["--count", "0"], "argument --count: must be at least 1, got 0"),
    (["--fraction", "1.5"], "argument --fraction: must be at most 1, got 1.5"),
    (["--fraction", "nan"], "argument --fraction: expected a number, got 'nan'"),
])
def test_a_value_out_of_the_fields_range_is_refused_naming_the_option(argv, problem, capsys):
    parser = argparse.ArgumentParser()
    add_options(parser, Ranged)
    assert parser.parse_args(["--count", "1", "--fraction", "1"]).fraction == 1.0  # the bounds are inclusive
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert problem in capsys.readouterr().err
