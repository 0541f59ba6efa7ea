#!/usr/bin/env python
"""Accuracy benchmark: herbarium's pipeline against two flat baselines under one budget.

    python bench/accuracy.py --data DATA --train-split train_lt --size 128 --epochs 30
    python bench/accuracy.py --data DATA --only herbarium --herbarium-args="--sampler sqrt" --out bench/results/sqrt

Every arm shares the budget: trunk, pretrained initialisation, input size,
epochs, batch size, seed, training and validation splits (``best.pt`` is the
epoch with the best finest-rank macro-F1 on the validation split).

* ``herbarium``: collect-stats on the training split, then training with every
  library default (a head per rank, the default loss, class weights, rank
  weights, sampler and schedule), then evaluation with the default TTA views;
  the headline variant is the evaluation's primary one (consistent decoding).
* ``ce``: a finest-rank head only, flat cross-entropy, ImageNet mean/std, one
  plain view and no TTA. With a single head, consistent decoding returns the
  species head's argmax and its ancestors, so genus and family are the species
  prediction mapped up the taxonomy.
* ``la``: as ``ce`` with the logit-adjusted loss (tau 1).

The arms run in this process through the library (``herbarium.engine.train``
and ``herbarium.evaluation.runner.evaluate``); before each run the harness
checks that the train.py / tta_eval.py command lines it prints rebuild exactly
the same configuration. Each arm writes ``OUT/<arm>/result.json``; the
comparison (``OUT/comparison.json`` and ``OUT/comparison.md``) is rebuilt from
every result present, so arms run separately with ``--only`` share one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from herbarium import train_cli
from herbarium.config import DataConfig, LossConfig, TrainConfig
from herbarium.evaluation import cli as eval_cli
from herbarium.evaluation.runner import EvaluationSettings
from herbarium.models import ModelConfig
from herbarium.stats_file import IMAGENET_MEAN, IMAGENET_STD
from herbarium.taxonomy import DEFAULT_RANKS

ARMS: dict[str, str] = {
    "herbarium": "herbarium defaults: a head per rank, default loss and sampling, collect-stats, TTA + consistent decoding",
    "ce": "flat cross-entropy, finest-rank head only, ImageNet mean/std, one plain view",
    "la": "logit-adjusted cross-entropy (tau 1), finest-rank head only, ImageNet mean/std, one plain view",
}
BASELINE_LOSSES: dict[str, str] = {"ce": "ce", "la": "logit_adjusted"}
SHOT_GROUPS = ("many", "medium", "few")
# Config fields ("section.field") that define the shared budget: --herbarium-args may not change them.
BUDGET_FIELDS = ("data.data", "data.train_split", "data.val_split", "data.size", "data.batch_size",
                 "model.trunk", "model.pretrained", "epochs", "seed")


@dataclass(frozen=True)
class Budget:
    """What every arm shares (the one source of the harness's defaults)."""

    data: str = ""
    train_split: str = "train_lt"
    val_split: str | None = "val"  # None: hold out part of the training split
    test_split: str = "test"
    trunk: str = "efficientnet_lite0"
    pretrained: bool = True
    size: int = 128
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    workers: int | None = None  # None: all cores
    device: str = "auto"


@dataclass
class Arm:
    """One contender: its training config, its evaluation settings and how it normalises."""

    name: str
    description: str
    train: TrainConfig
    evaluation: EvaluationSettings
    collects_stats: bool


@dataclass
class ArmPaths:
    root: Path
    run: Path = field(init=False)
    evaluation: Path = field(init=False)
    result: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run = self.root / "run"
        self.evaluation = self.root / "eval"
        self.result = self.root / "result.json"


def collected_stats_path(out: Path) -> Path:
    return out / "stats.json"


def imagenet_stats_path(out: Path) -> Path:
    return out / "imagenet_stats.json"


# ------------------------------------------------------------------ configs
def base_config(budget: Budget, run_dir: Path, stats: Path) -> TrainConfig:
    """Library defaults everywhere except the shared budget, the run folder and the stats file."""
    return TrainConfig(
        out=str(run_dir), epochs=budget.epochs, seed=budget.seed, device=budget.device,
        data=DataConfig(data=str(budget.data), train_split=budget.train_split, val_split=budget.val_split,
                        stats=str(stats), size=budget.size, batch_size=budget.batch_size, workers=budget.workers),
        model=ModelConfig(trunk=budget.trunk, pretrained=budget.pretrained),
    )


def herbarium_config(budget: Budget, run_dir: Path, stats: Path, extra_args: Sequence[str] = ()) -> TrainConfig:
    """The library's defaults under the budget, then ``extra_args`` as train.py would apply them."""
    cfg = base_config(budget, run_dir, stats)
    if not extra_args:
        return cfg
    args = train_cli.build_parser().parse_args([*train_arguments(cfg), *extra_args])
    if args.resume or args.overwrite:
        raise ValueError("--herbarium-args may not hold --resume or --overwrite; pass --overwrite to the harness")
    changed = train_cli.config_from_args(args)
    before, after = flat_config(cfg), flat_config(changed)
    moved = [name for name in ("out", *BUDGET_FIELDS) if after[name] != before[name]]
    if moved:
        raise ValueError(f"--herbarium-args may not change the shared budget or the run folder: {moved}; "
                         "set them with the harness's own options")
    return changed


def baseline_config(budget: Budget, run_dir: Path, stats: Path, loss: str) -> TrainConfig:
    """One head at the finest rank, unweighted ``loss`` (tau 1 for logit adjustment), rank weight 1."""
    cfg = base_config(budget, run_dir, stats)
    finest = cfg.data.ranks[-1]
    return replace(cfg, loss=LossConfig(levels=(finest,), level_weights={finest: 1.0}, loss=loss, class_weights="none", tau=1.0))


def evaluation_settings(budget: Budget, views: tuple[str, ...] | None = None) -> EvaluationSettings:
    """The evaluation defaults with the budget's workers, seed and device; ``views`` overrides the TTA views."""
    settings = EvaluationSettings(workers=budget.workers, seed=budget.seed, device=budget.device)
    return settings if views is None else replace(settings, views=views)


def build_arms(budget: Budget, out: Path, names: Sequence[str] = tuple(ARMS),
               herbarium_args: Sequence[str] = ()) -> dict[str, Arm]:
    """The arms to run, in ``ARMS`` order."""
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    arms = {}
    for name in ARMS:
        if name not in names:
            continue
        run_dir = ArmPaths(out / name).run
        if name == "herbarium":
            cfg = herbarium_config(budget, run_dir, collected_stats_path(out), herbarium_args)
            arms[name] = Arm(name, ARMS[name], cfg, evaluation_settings(budget), collects_stats=True)
        else:
            cfg = baseline_config(budget, run_dir, imagenet_stats_path(out), BASELINE_LOSSES[name])
            arms[name] = Arm(name, ARMS[name], cfg, evaluation_settings(budget, views=("plain",)), collects_stats=False)
    return arms


# ----------------------------------------------------- equivalent commands
def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Every field of the config: ``name`` at the top level, ``section.name`` inside a section."""
    values = {}
    for top in dataclasses.fields(cfg):
        value = getattr(cfg, top.name)
        if dataclasses.is_dataclass(value):
            values.update({f"{top.name}.{f.name}": getattr(value, f.name) for f in dataclasses.fields(value)})
        else:
            values[top.name] = value
    return values


def option_names(fields: Sequence[str]) -> dict[str, str]:
    """The argparse ``dest`` each config field may go by: ``name``, ``section_name`` and, for a
    section's ``enabled`` switch, ``section``. A bare name two sections share is left out."""
    names: dict[str, list[str]] = {}
    for path in fields:
        section, _, name = path.rpartition(".")
        aliases = [name] + ([f"{section}_{name}"] if section else []) + ([section] if name == "enabled" else [])
        for alias in aliases:
            names.setdefault(alias, []).append(path)
    return {alias: paths[0] for alias, paths in names.items() if len(paths) == 1}


def _format(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return ",".join(f"{key}={_format(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(_format(item) for item in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _arguments(parser: argparse.ArgumentParser, values: dict[str, Any], skip: Sequence[str]) -> tuple[list[str], set[str]]:
    """Positional values first, then every option whose value is not the parser's default.

    Returns the arguments and the keys of ``values`` that some option or positional covers.
    """
    names = option_names(list(values))
    positional, options, used = [], [], set()
    for action in parser._actions:
        if action.dest in skip or action.dest == "help":
            continue
        if action.dest not in names:
            raise KeyError(f"the harness does not know which setting {'/'.join(action.option_strings) or action.dest} sets")
        key = names[action.dest]
        used.add(key)
        value = values[key]
        if not action.option_strings:
            positional += [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]
            continue
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if bool(value) != bool(action.default):
                if bool(value) != isinstance(action, argparse._StoreTrueAction):
                    raise ValueError(f"{flag} cannot set {key}={value!r}")
                options.append(flag)
            continue
        text = _format(value)
        if text == _format(action.default):
            continue
        if text is None:
            raise ValueError(f"{flag} cannot set {key} back to None")
        options.extend([flag, text])
    return positional + options, used


def train_arguments(cfg: TrainConfig) -> list[str]:
    """train.py's arguments (without the program name) that rebuild ``cfg``.

    Raises:
        ValueError: a field differs from its default but train.py has no option for it.
    """
    values = flat_config(cfg)
    arguments, used = _arguments(train_cli.build_parser(), values, skip=("resume", "resume_if_exists", "overwrite"))
    defaults = flat_config(TrainConfig())
    hidden = [key for key in values if key not in used and values[key] != defaults.get(key)]
    if hidden:
        raise ValueError(f"train.py has no option for {hidden}; keep them at their defaults")
    return arguments


def eval_arguments(run_dir: Path, data: str, split: str, out: Path, settings: EvaluationSettings) -> list[str]:
    """tta_eval.py's arguments (without the program name) that evaluate ``run_dir`` with ``settings``."""
    values = {**dataclasses.asdict(settings), "runs": [str(run_dir)], "data": str(data), "split": split,
              "labels": None, "out": str(out)}
    arguments, _ = _arguments(eval_cli.build_parser(), values, skip=())
    return arguments


def check_train_arguments(cfg: TrainConfig) -> list[str]:
    """``train_arguments(cfg)``, after checking that train.py would rebuild exactly ``cfg`` from them."""
    arguments = train_arguments(cfg)
    rebuilt = train_cli.config_from_args(train_cli.build_parser().parse_args(arguments))
    if rebuilt != cfg:
        wanted, built = flat_config(cfg), flat_config(rebuilt)
        differ = {key: (value, built.get(key)) for key, value in wanted.items() if built.get(key) != value}
        raise RuntimeError(f"train.py {shlex.join(arguments)} builds another config: {differ}")
    return arguments


def check_eval_arguments(run_dir: Path, data: str, split: str, out: Path, settings: EvaluationSettings) -> list[str]:
    """``eval_arguments(...)``, after checking that tta_eval.py would rebuild exactly ``settings`` from them."""
    arguments = eval_arguments(run_dir, data, split, out, settings)
    args = eval_cli.build_parser().parse_args(arguments)
    rebuilt = eval_cli.settings_from_args(args)
    if rebuilt != settings or args.runs != [str(run_dir)] or args.split != split or args.out != str(out):
        raise RuntimeError(f"tta_eval.py {shlex.join(arguments)} evaluates otherwise: {rebuilt} != {settings}")
    return arguments


def stats_arguments(budget: Budget, out: Path, ranks: Sequence[str]) -> list[str]:
    arguments = [str(budget.data), "--split", budget.train_split, "--size", str(budget.size), "--out", str(out)]
    if tuple(ranks) != DEFAULT_RANKS:
        arguments += ["--ranks", ",".join(ranks)]
    return arguments + (["--workers", str(budget.workers)] if budget.workers is not None else [])


def arm_commands(arm: Arm, budget: Budget, out: Path) -> list[str]:
    """The shell commands that run the same arm from the command line."""
    paths = ArmPaths(out / arm.name)
    commands = []
    if arm.collects_stats:
        commands.append("herbarium collect-stats " + shlex.join(stats_arguments(budget, Path(arm.train.data.stats), arm.train.data.ranks)))
    else:
        commands.append(f"# {arm.train.data.stats}: {json.dumps(imagenet_stats())}")
    commands.append("python train.py " + shlex.join(check_train_arguments(arm.train)))
    eval_args = check_eval_arguments(paths.run, budget.data, budget.test_split, paths.evaluation, arm.evaluation)
    commands.append("python tta_eval.py " + shlex.join(eval_args))
    return commands


# -------------------------------------------------------------------- runs
def imagenet_stats() -> dict[str, Any]:
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "source": "ImageNet (timm defaults)"}


def hardware_description(device: str) -> str:
    from herbarium.engine import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return f"{torch.cuda.get_device_name(resolved)}, torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"CPU ({platform.processor() or platform.machine()}, {cores} cores, {torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}")


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def summarise_variant(ranks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The table's figures of one evaluation variant: ``{rank: {macro_f1, top1, top5, shot groups}}``."""
    summary = {}
    for rank, metrics in ranks.items():
        groups = metrics.get("shot_groups") or {}
        summary[rank] = {
            "macro_f1": metrics["macro_f1"], "top1": metrics["top1"], "top5": metrics.get("top5"),
            "shot_thresholds": metrics.get("shot_thresholds"),
            **{f"{group}_accuracy": (groups.get(group) or {}).get("accuracy") for group in SHOT_GROUPS},
            **{f"{group}_classes": (groups.get(group) or {}).get("classes") for group in SHOT_GROUPS},
        }
    return summary


def ensure_stats(arm: Arm, budget: Budget, out: Path) -> float:
    """Write the arm's normalisation file (collect-stats, or the ImageNet values); returns seconds spent."""
    path = Path(arm.train.data.stats)
    started = time.perf_counter()
    if not arm.collects_stats:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(imagenet_stats(), indent=2))
        return 0.0
    from herbarium import stats

    stats.run(stats.build_parser().parse_args([*stats_arguments(budget, path, arm.train.data.ranks), "--quiet"]))
    return time.perf_counter() - started


def run_arm(arm: Arm, budget: Budget, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Normalisation, training and evaluation of one arm; writes and returns its result record."""
    from herbarium.engine import train
    from herbarium.evaluation.runner import evaluate

    paths = ArmPaths(out / arm.name)
    commands = arm_commands(arm, budget, out)  # also checks that the commands rebuild these settings
    print(f"\n== {arm.name}: {arm.description}\n" + "\n".join(commands), flush=True)
    load_before = _load_average()
    seconds = {"stats": ensure_stats(arm, budget, out)}
    started = time.perf_counter()
    train(arm.train, overwrite=overwrite)
    seconds["train"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = evaluate([paths.run], budget.data, budget.test_split, None, paths.evaluation, arm.evaluation)
    seconds["evaluate"] = time.perf_counter() - started
    seconds["total"] = sum(seconds.values())
    metrics = evaluation["metrics"]
    if "variants" not in metrics:
        raise ValueError(f"split {budget.test_split!r} of {budget.data} has no labels to score against")
    record = {
        "arm": arm.name, "description": arm.description, "variant": metrics["primary"],
        "metrics": summarise_variant(metrics["variants"][metrics["primary"]]),
        "variants": {name: summarise_variant(ranks) for name, ranks in metrics["variants"].items()},
        "seconds": seconds, "hardware": hardware_description(budget.device),
        "load_average": {"start": load_before, "end": _load_average()},  # other jobs on the machine slow the wall times
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "budget": dataclasses.asdict(budget), "commands": commands,
        "train_config": arm.train.to_dict(), "evaluation_settings": dataclasses.asdict(arm.evaluation),
        "eval_images_per_s": metrics["throughput"]["images_per_s"],
    }
    paths.result.write_text(json.dumps(record, indent=2))
    return record


# ------------------------------------------------------------------- table
def load_results(out: Path) -> dict[str, dict[str, Any]]:
    """Every arm's result.json under ``out``, in ``ARMS`` order."""
    return {name: json.loads(ArmPaths(out / name).result.read_text()) for name in ARMS if ArmPaths(out / name).result.is_file()}


def ranks_fine_to_coarse(results: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(results.values()))
    return list(reversed(list(first["metrics"])))


def table_columns(ranks: Sequence[str]) -> list[tuple[str, str, str]]:
    """(column title, rank, metric key) in table order: per rank macro-F1 and top-1, then finest-rank shot groups."""
    columns = []
    for rank in ranks:
        columns += [(f"{rank} macro-F1", rank, "macro_f1"), (f"{rank} top-1", rank, "top1")]
    finest = ranks[0]
    columns += [(f"{finest} {group}-shot acc", finest, f"{group}_accuracy") for group in SHOT_GROUPS]
    return columns


def comparison_table(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rows (one per arm) of the headline metrics, and the herbarium arm's margins over the baselines."""
    ranks = ranks_fine_to_coarse(results)
    columns = table_columns(ranks)
    rows = []
    for name, result in results.items():
        row = {"arm": name, "variant": result["variant"]}
        row.update({title: result["metrics"][rank][key] for title, rank, key in columns})
        row["wall_minutes"] = result["seconds"]["total"] / 60
        rows.append(row)
    return {"ranks": ranks, "columns": [title for title, _, _ in columns], "rows": rows, "margins": margins(results, ranks)}


def margins(results: dict[str, dict[str, Any]], ranks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Herbarium's macro-F1 minus each baseline's and minus the better baseline's, per rank."""
    baselines = [name for name in results if name != "herbarium"]
    if "herbarium" not in results or not baselines:
        return {}
    ours = results["herbarium"]["metrics"]
    table = {}
    for rank in ranks:
        deltas = {f"vs_{name}": ours[rank]["macro_f1"] - results[name]["metrics"][rank]["macro_f1"] for name in baselines}
        best = max(results[name]["metrics"][rank]["macro_f1"] for name in baselines)
        table[rank] = {**deltas, "vs_better_baseline": ours[rank]["macro_f1"] - best}
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def render_markdown(table: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    first = next(iter(results.values()))
    budget = first["budget"]
    finest = table["ranks"][0]
    low, high = first["metrics"][finest]["shot_thresholds"] or (None, None)
    lines = [
        f"# Accuracy: herbarium against flat baselines ({Path(budget['data']).name}, "
        f"{budget['train_split']} -> {budget['test_split']})", "",
        f"Budget: {budget['trunk']} ({'pretrained' if budget['pretrained'] else 'random init'}), {budget['size']} px, "
        f"{budget['epochs']} epochs, batch {budget['batch_size']}, seed {budget['seed']}; "
        f"best.pt chosen on {budget['val_split'] or 'a held-out part of ' + budget['train_split']}.",
        f"Hardware: {first['hardware']}. Date: {max(r['date'] for r in results.values())}.", "",
    ]
    header = ["arm", "variant", *table["columns"], "wall (min)"]
    rows = [[row["arm"], row["variant"], *(row[c] for c in table["columns"]), f"{row['wall_minutes']:.1f}"] for row in table["rows"]]
    lines += _markdown_table(header, rows)
    lines += ["", f"Shot groups: {finest} classes by training images of {budget['train_split']}: "
              f"few < {low} <= medium <= {high} < many. Genus and family of the baselines are the ancestors of their "
              f"{finest} prediction (consistent decoding with a single head)."]
    if table["margins"]:
        baselines = list(next(iter(table["margins"].values())))
        lines += ["", "Macro-F1 margin of herbarium:", ""]
        lines += _markdown_table(["rank", *baselines], [[rank, *deltas.values()] for rank, deltas in table["margins"].items()])
    if "herbarium" in results:
        variants = results["herbarium"]["variants"]
        lines += ["", "Herbarium's evaluation variants (TTA views vs the plain view alone; heads vs consistent decoding):", ""]
        header = ["variant", *(f"{rank} macro-F1" for rank in table["ranks"]), *(f"{rank} top-1" for rank in table["ranks"])]
        rows = [[name, *(v[r]["macro_f1"] for r in table["ranks"] if r in v), *(v[r]["top1"] for r in table["ranks"] if r in v)]
                for name, v in variants.items() if all(r in v for r in table["ranks"])]
        lines += _markdown_table(header, rows)
    lines += ["", "Wall time per stage (s), with the machine's 1-minute load average:", ""]
    def load(result: dict[str, Any], when: str) -> str:
        value = (result.get("load_average") or {}).get(when)
        return "-" if value is None else f"{value:.1f}"

    lines += _markdown_table(["arm", "stats", "train", "evaluate", "total", "load avg start/end"],
                             [[name, *(f"{r['seconds'][k]:.0f}" for k in ("stats", "train", "evaluate", "total")),
                               f"{load(r, 'start')} / {load(r, 'end')}"]
                              for name, r in results.items()])
    lines += ["", "Equivalent command lines:", ""]
    for name, result in results.items():
        lines += [f"{name}:", "", "```", *result["commands"], "```", ""]
    return "\n".join(lines)


def write_comparison(out: Path) -> dict[str, Any]:
    """Rebuild OUT/comparison.json and OUT/comparison.md from every arm's result."""
    results = load_results(out)
    if not results:
        raise FileNotFoundError(f"no arm result under {out}")
    table = comparison_table(results)
    (out / "comparison.json").write_text(json.dumps({"table": table, "results": results}, indent=2))
    (out / "comparison.md").write_text(render_markdown(table, results))
    return table


# --------------------------------------------------------------------- cli
def _arm_names(value: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown or value!r}; choose from {', '.join(ARMS)}")
    return names


def _optional_split(value: str) -> str | None:
    return None if value.lower() in ("", "none") else value


def build_parser() -> argparse.ArgumentParser:
    B = Budget()
    parser = argparse.ArgumentParser(prog="bench/accuracy.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Arms: " + "; ".join(f"{k}: {v}" for k, v in ARMS.items()))
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset folder (Herbarium layout) with a training and a labelled test split")
    data.add_argument("--train-split", default=B.train_split, help=f"training split (default: {B.train_split})")
    data.add_argument("--val-split", type=_optional_split, default=B.val_split,
                      help=f"split that picks best.pt; 'none' holds out part of the training split (default: {B.val_split})")
    data.add_argument("--test-split", default=B.test_split, help=f"labelled split that is scored (default: {B.test_split})")
    budget = parser.add_argument_group("shared budget")
    budget.add_argument("--trunk", default=B.trunk, help=f"timm trunk (default: {B.trunk})")
    budget.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=B.pretrained,
                        help=f"start from the trunk's packaged ImageNet weights (default: {B.pretrained})")
    budget.add_argument("--size", type=int, default=B.size, help=f"input side in pixels (default: {B.size})")
    budget.add_argument("--epochs", type=int, default=B.epochs, help=f"epochs (default: {B.epochs})")
    budget.add_argument("--batch-size", type=int, default=B.batch_size, help=f"images per step (default: {B.batch_size})")
    budget.add_argument("--seed", type=int, default=B.seed, help=f"seed of every arm (default: {B.seed})")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=B.workers, help="decoding processes (default: all cores)")
    run.add_argument("--device", default=B.device, help=f"cpu, cuda or auto (default: {B.device})")
    run.add_argument("--only", type=_arm_names, default=tuple(ARMS), help=f"comma-separated arms to run (default: {','.join(ARMS)})")
    run.add_argument("--herbarium-args", default="", help="extra train.py options for the herbarium arm, written --herbarium-args=\"--sampler sqrt\" (default: none)")
    run.add_argument("--out", default=None, help="output folder (default: bench/results/accuracy_<train-split>)")
    run.add_argument("--overwrite", action="store_true", help="replace runs already in OUT instead of refusing (default: off)")
    return parser


def budget_from_args(args: argparse.Namespace) -> Budget:
    return Budget(data=args.data, train_split=args.train_split, val_split=args.val_split, test_split=args.test_split,
                  trunk=args.trunk, pretrained=args.pretrained, size=args.size, epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed, workers=args.workers, device=args.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = budget_from_args(args)
    out = Path(args.out or f"bench/results/accuracy_{budget.train_split}")
    arms = build_arms(budget, out, args.only, shlex.split(args.herbarium_args))
    for arm in arms.values():  # fail on an inexpressible config before hours of training
        arm_commands(arm, budget, out)
    out.mkdir(parents=True, exist_ok=True)
    for arm in arms.values():
        run_arm(arm, budget, out, overwrite=args.overwrite)
        write_comparison(out)
    print("\n" + (out / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
