"""LR range test: the loss while the learning rate rises exponentially, and a suggested LR.

The AliProducts solution chose its initial learning rate from "the loss vs
learning rate figure, plotted by increasing the learning rate from 1e-6 to
1e1 within 2 epochs". ``herbarium lr-find`` draws that figure with the run's
own model, loss, optimizer (the first phase of ``--optim``; its LR is
replaced by the sweep) and training input pipeline:

1. The LR of step i is start * (end / start) ** (i / (steps - 1)).
2. Each step is one optimizer update (of ``--accum-steps`` batches) from the
   weights the previous steps left; its training loss is recorded.
3. The smoothed loss is a bias-corrected exponential moving average in which
   each new loss has weight ``--ema``.
4. The sweep stops early when the smoothed loss exceeds ``--diverge`` times
   its minimum so far, or a loss is NaN or infinite.
5. The suggestion is the LR where the smoothed loss falls fastest against
   log(LR), searched from the start up to the smoothed loss's minimum
   ("steepest descent"). The LR of that minimum divided by 10 is reported
   alongside, a second common rule.

Only ``lr_find.png`` and ``lr_find.json`` are written, into ``--out``; a
folder that holds a training run (config.json, checkpoints/ or log.jsonl)
is refused, so no run or checkpoint is ever changed.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from herbarium.arguments import ArgumentParser
from herbarium.build import Loaders, build_loaders, build_run_loss, build_run_model, optimizer_phases, resolve_normalization
from herbarium.config import OptimConfig, TrainConfig
from herbarium.data.readers import DatasetSplit
from herbarium.data.splits import read_train_val
from herbarium.distributed import DistributedContext
from herbarium.engine import forward_loss
from herbarium.errors import command
from herbarium.optim import OPTIMIZERS, Phase
from herbarium.run_dir import RunDir
from herbarium.runtime import autocast_dtype, resolve_device
from herbarium.terminal import show_progress
from herbarium.train_cli import add_train_arguments, config_from_args, parse_train_args

DEFAULT_OUT = "runs/lr_find"
RULE = "steepest descent of the smoothed loss against log(lr), searched up to the smoothed loss's minimum"


@dataclass(frozen=True)
class RangeTestSettings:
    """The sweep: LRs from ``start_lr`` to ``end_lr`` in ``steps`` exponential steps."""

    start_lr: float = 1e-6
    end_lr: float = 10.0
    steps: int = 100
    ema: float = 0.05  # weight of each new loss in the smoothed loss
    diverge: float = 4.0  # stop when the smoothed loss exceeds this many times its minimum

    def __post_init__(self) -> None:
        if not 0 < self.start_lr < self.end_lr:
            raise ValueError(f"--start-lr and --end-lr need 0 < start < end, got {self.start_lr} and {self.end_lr}")
        if self.steps < 3:
            raise ValueError(f"--steps must be at least 3, got {self.steps}")
        if not 0 < self.ema <= 1:
            raise ValueError(f"--ema must be in (0, 1], got {self.ema}")
        if not self.diverge > 1:
            raise ValueError(f"--diverge must be > 1, got {self.diverge}")


# ------------------------------------------------------------ pure functions
def exponential_lrs(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` learning rates from ``start`` to ``end``, equally spaced in log(lr): start * (end/start) ** (i/(steps-1))."""
    if not 0 < start < end:
        raise ValueError(f"exponential LRs need 0 < start < end, got {start} and {end}")
    if steps < 2:
        raise ValueError(f"exponential LRs need at least 2 steps, got {steps}")
    return np.geomspace(start, end, steps)


def smooth(losses: Sequence[float], weight: float) -> np.ndarray:
    """Bias-corrected exponential moving average of ``losses``.

    1. average_i = (1 - weight) * average_{i-1} + weight * loss_i, average_{-1} = 0.
    2. smoothed_i = average_i / (1 - (1 - weight) ** (i + 1)), so early values
       are not pulled towards the initial 0 (a constant input stays constant).
    """
    if not 0 < weight <= 1:
        raise ValueError(f"the smoothing weight must be in (0, 1], got {weight}")
    values = np.asarray(losses, dtype=float)
    smoothed = np.empty_like(values)
    average = 0.0
    for i, loss in enumerate(values):
        average = (1 - weight) * average + weight * loss
        smoothed[i] = average / (1 - (1 - weight) ** (i + 1))
    return smoothed


class NoSuggestionError(ValueError):
    """The curve has no falling part to suggest an LR from."""


@dataclass(frozen=True)
class LRSuggestion:
    lr: float  # the steepest-descent LR
    index: int  # its step
    min_loss_lr: float  # the LR of the smoothed loss's minimum
    rule: str = RULE

    @property
    def min_loss_lr_over_10(self) -> float:
        return self.min_loss_lr / 10


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float]) -> LRSuggestion:
    """The LR where the smoothed loss falls fastest against log(lr), up to the loss's minimum.

    Raises :class:`NoSuggestionError` when fewer than 3 points exist or the
    smoothed loss never falls below its first value.
    """
    lrs, smoothed = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    if lrs.shape != smoothed.shape:
        raise ValueError(f"{len(lrs)} learning rates but {len(smoothed)} losses")
    if len(lrs) < 3:
        raise NoSuggestionError(f"only {len(lrs)} step(s) ran before the sweep stopped; lower --start-lr or raise --diverge")
    lowest = int(np.argmin(smoothed))
    slopes = np.gradient(smoothed, np.log(lrs))  # d loss / d log(lr)
    steepest = int(np.argmin(slopes[: lowest + 1]))
    if lowest == 0 or slopes[steepest] >= 0:
        raise NoSuggestionError(f"the smoothed loss never fell below its first value (at lr {lrs[0]:.3g}); lower --start-lr")
    return LRSuggestion(lr=float(lrs[steepest]), index=steepest, min_loss_lr=float(lrs[lowest]))


@dataclass
class RangeTestResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stop_reason: str = "reached the end LR"
    skipped_bad_images: int = 0  # unreadable images skipped (--skip-bad-images)


def range_test(step: Callable[[float], float], lrs: Iterable[float], weight: float, diverge: float) -> RangeTestResult:
    """Call ``step(lr)`` (one optimizer update at ``lr``, returning its loss) for each LR until the loss diverges.

    Stops after the first step whose smoothed loss exceeds ``diverge`` times
    the smallest smoothed loss so far (that step is kept in the curve), or
    before recording a NaN/infinite loss. Losses are assumed positive.
    """
    result = RangeTestResult()
    for lr in lrs:
        loss = float(step(float(lr)))
        if not math.isfinite(loss):
            result.stop_reason = f"the loss became {loss} at lr {lr:.3g}"
            break
        result.lrs.append(float(lr))
        result.losses.append(loss)
        result.smoothed = smooth(result.losses, weight).tolist()
        best = min(result.smoothed)
        if result.smoothed[-1] > diverge * best:
            result.stop_reason = f"the smoothed loss {result.smoothed[-1]:.4g} exceeded {diverge:g} x its minimum {best:.4g} at lr {lr:.3g}"
            break
    return result


# ------------------------------------------------------- the run's pieces
def first_phase(optim: OptimConfig) -> Phase:
    """The first phase of ``--optim``, with ``--weight-decay`` applied as training applies it."""
    return optimizer_phases(optim)[0]


def build_model_and_loss(cfg: TrainConfig, train: DatasetSplit, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The model and multi-rank loss a training run of ``cfg`` starts from."""
    for rank in cfg.loss.levels:
        train.taxonomy.check_rank(rank)
    return build_run_model(cfg, train.taxonomy, device), build_run_loss(cfg, train).to(device)


def endless_batches(loaders: Loaders, counts: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """Training batches epoch after epoch, each epoch in the sampler's order for that epoch.

    ``counts["skipped"]`` (when given) adds up the unreadable images skipped.
    """
    epoch = 0
    while True:
        loaders.sampler.set_epoch(epoch)
        yielded = False
        for batch in loaders.train:
            if counts is not None:
                counts["skipped"] = counts.get("skipped", 0) + batch["skipped"]
            if "image" in batch:
                yielded = True
                yield batch
        if not yielded:
            raise RuntimeError("the training split gave no readable batch")
        epoch += 1


def training_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[dict[str, Any]],
                  cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None) -> Callable[[float], float]:
    """``step(lr)``: one optimizer update at ``lr`` over ``accum_steps`` batches; returns their mean loss."""
    levels, accum_steps, clip = tuple(cfg.loss.levels), cfg.optim.accum_steps, cfg.optim.clip_grad
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum_steps):
            result = forward_loss(model, loss_fn, next(batches), levels, device, dtype, cfg.channels_last)
            scaler.scale(result.total / accum_steps).backward()
            total += float(result.total.detach())
        if clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        return total / accum_steps

    return step


def find_lr(cfg: TrainConfig, settings: RangeTestSettings) -> tuple[RangeTestResult, Phase]:
    """Run the range test for a training config; returns the curve and the optimizer phase it used."""
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    train, val = read_train_val(cfg)
    loaders = build_loaders(cfg, train, val, resolve_normalization(cfg), DistributedContext(), device)
    model, loss_fn = build_model_and_loss(cfg, train, device)
    phase = first_phase(cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[phase.name]([{"params": params}], settings.start_lr, phase.weight_decay)
    model.train()
    counts = {"skipped": 0}
    step = training_step(torch.compile(model) if cfg.compile else model, loss_fn, optimizer,
                         endless_batches(loaders, counts), cfg, device, dtype)
    lrs = tqdm(exponential_lrs(settings.start_lr, settings.end_lr, settings.steps), desc="lr-find", unit="step",
               leave=False, dynamic_ncols=True, disable=not show_progress())
    result = range_test(step, lrs, settings.ema, settings.diverge)
    result.skipped_bad_images = counts["skipped"]
    return result, phase


# ----------------------------------------------------------------- outputs
def check_output_dir(out: Path) -> None:
    """Refuse a folder that holds a training run: lr-find writes nothing into a run."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    found = RunDir(out).training_markers()
    if found:
        raise FileExistsError(f"--out {out} holds a training run ({', '.join(found)}); lr-find never writes into a run, "
                              f"pass another --out such as {out / 'lr_find'}")


def plot_range_test(result: RangeTestResult, suggestion: LRSuggestion | None, ema: float) -> Figure:
    figure = Figure(figsize=(6.5, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot(result.lrs, result.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    axes.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=2, label=f"smoothed (EMA weight {ema:g})")
    if suggestion is not None:
        axes.axvline(suggestion.lr, color="tab:red", label=f"suggested {suggestion.lr:.2e} (steepest descent)")
        axes.axvline(suggestion.min_loss_lr_over_10, color="tab:gray", linestyle="--",
                     label=f"min-loss lr / 10 = {suggestion.min_loss_lr_over_10:.2e}")
        falling = result.smoothed[: int(np.argmin(result.smoothed)) + 1]
        low, high = min(min(result.losses), min(result.smoothed)), max(falling)
        axes.set_ylim(low - 0.05 * (high - low), high + 0.25 * (high - low))
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title("LR range test")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return figure


def write_outputs(out: Path, result: RangeTestResult, suggestion: LRSuggestion | None, no_suggestion: str | None,
                  settings: RangeTestSettings, phase: Phase, cfg: TrainConfig) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "lr_find.png", "json": out / "lr_find.json"}
    document = {
        "lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed,
        "suggestion": suggestion.lr if suggestion else None,
        "rule": RULE,
        "min_loss_lr": suggestion.min_loss_lr if suggestion else None,
        "min_loss_lr_over_10": suggestion.min_loss_lr_over_10 if suggestion else None,
        "no_suggestion": no_suggestion,
        "stopped": result.stop_reason,
        "sweep": asdict(settings),
        "optimizer": {"name": phase.name, "optim_lr": phase.lr, "weight_decay": phase.weight_decay},
        "config": cfg.to_dict(),
    }
    paths["json"].write_text(json.dumps(document, indent=2))
    plot_range_test(result, suggestion, settings.ema).savefig(paths["png"], format="png")
    return paths


# --------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    defaults = RangeTestSettings()
    parser = ArgumentParser(
        prog="herbarium lr-find", conflict_handler="resolve",
        description="LR range test: train with the run's model, loss, first optimizer phase and input pipeline while the "
                    "learning rate rises exponentially; plot the loss and suggest an LR. Takes the options of train; "
                    "those that act over a whole run (epochs, schedule, later --optim phases, plateau switching, O2U, "
                    "snapshots, checkpoints) have no effect. Note: --smoothing is the loss's label smoothing, as in "
                    "train; the curve's smoothing is --ema.",
    )
    add_train_arguments(parser)
    sweep = parser.add_argument_group("LR range test")
    sweep.add_argument("--start-lr", type=float, default=defaults.start_lr, help=f"first learning rate (default: {defaults.start_lr:g})")
    sweep.add_argument("--end-lr", type=float, default=defaults.end_lr, help=f"last learning rate (default: {defaults.end_lr:g})")
    sweep.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps from start to end (default: {defaults.steps})")
    sweep.add_argument("--ema", type=float, default=defaults.ema, help=f"weight of each new loss in the smoothed loss (default: {defaults.ema:g})")
    sweep.add_argument("--diverge", type=float, default=defaults.diverge, help=f"stop when the smoothed loss exceeds this many times its minimum (default: {defaults.diverge:g})")
    # Replaces train's --out (conflict_handler="resolve"): lr-find's output is not a run directory.
    sweep.add_argument("--out", default=DEFAULT_OUT, help=f"folder for lr_find.png and lr_find.json; a folder holding a training run is refused (default: {DEFAULT_OUT})")
    return parser


def summary(result: RangeTestResult, suggestion: LRSuggestion | None, no_suggestion: str | None, phase: Phase,
            paths: dict[str, Path]) -> str:
    lines = [f"lr-find: {len(result.lrs)} steps with {phase.name}, stopped: {result.stop_reason}"]
    if suggestion:
        lines.append(f"suggested lr {suggestion.lr:.2e} ({suggestion.rule}); min-loss lr / 10 = {suggestion.min_loss_lr_over_10:.2e}")
        lines.append(f"e.g. --optim {phase.name}@{suggestion.lr:.2g}:0 (--optim asked for {phase.name}@{phase.lr:g})")
    else:
        lines.append(f"no suggestion: {no_suggestion}")
    lines.append(f"plot: {paths['png']}")
    lines.append(f"curve: {paths['json']}")
    if result.skipped_bad_images:
        lines.append(f"skipped {result.skipped_bad_images} unreadable images (--skip-bad-images)")
    return "\n".join(lines)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_train_args(parser, argv)
    if args.resume or args.overwrite or args.resume_if_exists:
        parser.error("--resume, --resume-if-exists and --overwrite are train options; lr-find starts from the initial weights and writes only into its --out")
    if not (args.data or args.data_option):
        parser.error("the DATA folder is required")
    try:
        settings = RangeTestSettings(args.start_lr, args.end_lr, args.steps, args.ema, args.diverge)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out)
    check_output_dir(out)
    cfg = config_from_args(args)
    result, phase = find_lr(cfg, settings)
    suggestion, no_suggestion = None, None
    try:
        suggestion = suggest_lr(result.lrs, result.smoothed)
    except NoSuggestionError as error:
        no_suggestion = str(error)
    paths = write_outputs(out, result, suggestion, no_suggestion, settings, phase, cfg)
    print(summary(result, suggestion, no_suggestion, phase, paths))
    return 0 if suggestion else 1
