"""Tests for herbarium/lr_find.py: the pure sweep functions, a toy problem, and the command end to end."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from herbarium import cli
from herbarium.demo import make_demo_data
from herbarium.lr_find import (
    DEFAULT_OUT,
    RULE,
    NoSuggestionError,
    RangeTestSettings,
    build_parser,
    exponential_lrs,
    main,
    range_test,
    smooth,
    suggest_lr,
)
from herbarium.train_cli import build_parser as train_parser


# ------------------------------------------------------------ pure functions
def test_exponential_lrs_follow_the_formula():
    lrs = exponential_lrs(1e-6, 10.0, 8)
    expected = [1e-6 * (10.0 / 1e-6) ** (i / 7) for i in range(8)]
    assert np.allclose(lrs, expected, rtol=1e-12)
    assert lrs[0] == pytest.approx(1e-6, rel=1e-12) and lrs[-1] == pytest.approx(10.0, rel=1e-12)
    for bad in ((0.0, 1.0, 5), (1.0, 0.1, 5), (1e-3, 1.0, 1)):
        with pytest.raises(ValueError):
            exponential_lrs(*bad)


def test_smooth_is_a_bias_corrected_moving_average():
    # w = 0.5: averages 0.5, 1.25, 2.125; corrections 1 - 0.5, 1 - 0.25, 1 - 0.125.
    assert np.allclose(smooth([1.0, 2.0, 3.0], 0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875], rtol=1e-12)
    assert np.allclose(smooth([4.0] * 6, 0.05), 4.0, rtol=1e-12)
    assert np.array_equal(smooth([3.0, 1.0, 2.0], 1.0), [3.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="smoothing weight"):
        smooth([1.0], 0.0)


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = exponential_lrs(1e-5, 1.0, 51)  # 10 points per decade: 1e-3 is point 20
    x = np.log(lrs)
    # Falls fastest at lr 1e-3 (tanh), bottoms out near 3e-2, then rises steeply.
    curve = 2 - np.tanh(x - math.log(1e-3)) + 0.05 * np.exp(2 * (x - math.log(3e-2)))
    suggestion = suggest_lr(lrs, curve)
    assert suggestion.lr == pytest.approx(1e-3, rel=1e-9) and suggestion.index == 20
    assert suggestion.min_loss_lr == lrs[int(np.argmin(curve))]
    assert suggestion.min_loss_lr_over_10 == pytest.approx(suggestion.min_loss_lr / 10)
    assert suggestion.rule == RULE
    # Steeper falls after the minimum (a diverging loss jumping about) are not candidates.
    jumpy = curve.copy()
    jumpy[46:] = curve.min() + np.array([10.0, 1.0, 30.0, 2.0, 50.0])
    assert int(np.argmin(jumpy)) < 46 and suggest_lr(lrs, jumpy).index == 20


def test_no_suggestion_when_the_loss_never_falls():
    lrs = exponential_lrs(1e-3, 1.0, 10)
    with pytest.raises(NoSuggestionError, match="never fell"):
        suggest_lr(lrs, np.linspace(1.0, 5.0, 10))
    with pytest.raises(NoSuggestionError, match="2 step"):
        suggest_lr(lrs[:2], [2.0, 1.0])


def test_range_test_stops_on_divergence_and_on_nan():
    lrs = exponential_lrs(1e-3, 1e3, 61)
    seen = []

    def quadratic(lr: float) -> float:  # loss 1 below lr 1, growing as lr**2 above
        seen.append(lr)
        return 1.0 + max(lr - 1.0, 0.0) ** 2

    result = range_test(quadratic, lrs, weight=1.0, diverge=4.0)
    first_above = next(i for i, lr in enumerate(lrs) if 1.0 + (lr - 1.0) ** 2 > 4.0 and lr > 1)
    assert len(result.lrs) == first_above + 1 == len(seen)  # the diverging step is kept, no step after it
    assert result.smoothed[-1] > 4.0 * min(result.smoothed) and "exceeded 4 x" in result.stop_reason

    def nan_at_one(lr: float) -> float:
        return float("nan") if lr >= 1.0 else 2.0 - lr

    result = range_test(nan_at_one, lrs, weight=0.3, diverge=4.0)
    assert all(lr < 1.0 for lr in result.lrs) and all(map(math.isfinite, result.losses))
    assert len(result.lrs) == int(np.sum(lrs < 1.0)) and "became nan" in result.stop_reason

    result = range_test(lambda lr: 1.0, lrs[:5], weight=0.3, diverge=4.0)
    assert len(result.lrs) == 5 and result.stop_reason == "reached the end LR"


# ------------------------------------------------------------- toy problem
def _regression(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Linear regression data and the largest stable gradient-descent LR, 2 / lambda_max of the MSE Hessian."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.5 + 0.1 * torch.randn(256, 1, generator=generator)
    with_bias = torch.cat([x, torch.ones(256, 1)], dim=1)
    hessian = 2 / len(x) * with_bias.T @ with_bias
    return x, y, 2 / float(torch.linalg.eigvalsh(hessian).max())


def _sgd_steps(x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def test_toy_linear_model_gets_a_stable_falling_learning_rate():
    x, y, stable_below = _regression()
    settings = RangeTestSettings(start_lr=1e-4, end_lr=1e2, steps=60)
    result = range_test(_sgd_steps(x, y), exponential_lrs(settings.start_lr, settings.end_lr, settings.steps),
                        settings.ema, settings.diverge)
    assert len(result.lrs) < settings.steps and "exceeded" in result.stop_reason  # gradient descent diverged
    suggestion = suggest_lr(result.lrs, result.smoothed)
    # Inside the range where the loss falls: above the first LR, below the stability bound of gradient descent...
    assert result.lrs[0] < suggestion.lr < stable_below
    slopes = np.gradient(result.smoothed, np.log(result.lrs))
    assert slopes[suggestion.index] < 0
    # ...and training at it from scratch makes the loss fall, while the LR where the sweep stopped diverges.
    step = _sgd_steps(x, y)
    losses = [step(suggestion.lr) for _ in range(40)]
    assert losses[-1] < losses[0] / 100
    step = _sgd_steps(x, y)
    assert [step(result.lrs[-1]) for _ in range(10)][-1] > losses[0]


# ---------------------------------------------------------------- command
def test_lr_find_is_a_herbarium_command():
    assert cli.COMMANDS["lr-find"][0] == "herbarium.lr_find"


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_parser_takes_every_train_option_and_its_own():
    train_options, options = _options(train_parser()), _options(build_parser())
    assert set(train_options) <= set(options)
    assert {"--start-lr", "--end-lr", "--steps", "--ema", "--diverge"} <= set(options)
    args = build_parser().parse_args(["DATA", "--smoothing", "0.2", "--steps", "7"])
    assert args.out == DEFAULT_OUT == "runs/lr_find" and args.smoothing == 0.2 and args.steps == 7
    assert args.start_lr == 1e-6 and args.end_lr == 10 and args.ema == 0.05 and args.diverge == 4.0
    assert "runs/lr_find" in options["--out"].help and "training run is refused" in options["--out"].help


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lr_find") / "demo"
    make_demo_data(out, image_size=32, max_per_class=6, min_per_class=2, test_per_class=1)
    return out


def _common(demo: Path, out: Path) -> list[str]:
    return [str(demo), "--trunk", "resnet10t", "--no-pretrained", "--size", "32", "--batch-size", "16", "--workers", "0",
            "--device", "cpu", "--val-split", "test", "--optim", "adam:0", "--out", str(out)]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_end_to_end_on_demo_data(demo, tmp_path, capsys):
    data_before = _tree(demo)
    out = tmp_path / "lr"
    code = main([*_common(demo, out), "--steps", "20", "--start-lr", "1e-5", "--end-lr", "1", "--ema", "0.3"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "lr_find.json").read_text())
    lrs, losses, smoothed = document["lrs"], document["losses"], document["smoothed"]
    assert 3 <= len(lrs) == len(losses) == len(smoothed) <= 20
    assert np.allclose(lrs, exponential_lrs(1e-5, 1.0, 20)[: len(lrs)])
    assert np.allclose(smoothed, smooth(losses, 0.3))
    suggestion = suggest_lr(lrs, smoothed)
    assert document["suggestion"] == suggestion.lr and document["rule"] == RULE
    assert np.gradient(smoothed, np.log(lrs))[suggestion.index] < 0  # where the loss falls
    assert document["optimizer"]["name"] == "adam" and document["config"]["data"]["size"] == 32
    assert f"suggested lr {suggestion.lr:.2e}" in printed and RULE in printed
    assert _tree(demo) == data_before  # nothing written next to the data


def test_a_run_directory_is_refused_and_left_untouched(demo, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"weights")
    (run / "config.json").write_text("{}")
    (run / "log.jsonl").write_text('{"epoch": 1}\n')
    before = _tree(run)
    assert main(_common(demo, run)) == 2
    assert "holds a training run (config.json, checkpoints, log.jsonl)" in capsys.readouterr().err
    assert _tree(run) == before
    (run / "checkpoints" / "last.pt").unlink()
    (run / "checkpoints").rmdir()
    assert main(_common(demo, run)) == 2
    assert "holds a training run (config.json, log.jsonl)" in capsys.readouterr().err


def test_train_only_options_and_bad_sweeps_are_refused(demo, tmp_path, capsys):
    for extra, message in ((["--resume", str(tmp_path)], "--resume, --resume-if-exists and --overwrite"),
                           (["--overwrite"], "--resume, --resume-if-exists and --overwrite"),
                           (["--start-lr", "1", "--end-lr", "0.1"], "0 < start < end"), (["--steps", "2"], "at least 3"),
                           (["--ema", "0"], "--ema"), (["--diverge", "1"], "--diverge")):
        with pytest.raises(SystemExit) as exit_:
            main([*_common(demo, tmp_path / "out"), *extra])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
