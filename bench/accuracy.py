#!/usr/bin/env python
"""Accuracy benchmark: herbarium against the stock timm script a user would write, under one budget.

    python bench/accuracy.py --data DATA --train-split train_lt --size 128 --epochs 30
    python bench/accuracy.py --data DATA --only herbarium --herbarium-args="--sampler sqrt" --out bench/results/sqrt

The shared budget is the data (training, validation and test splits), the
trunk and its initialisation, the input size, the number of epochs, the
batch size with one rule for the short last batch (dropped, as by timm's and
herbarium's trainers, so every arm takes ``epochs * floor(images / batch)``
optimizer steps, stated in the table) and the seed. Everything
else is each contender's own default:

* ``stock_ce`` / ``stock_la``: ``bench/stock.py``, a plain timm + torchvision
  script with its own loop (AdamW 1e-3, weight decay 0.05, warm-up
  + cosine, the weights' own normalisation, one centre-crop view), trained on
  the whole training split and scored at its last epoch; cross-entropy or
  logit-adjusted cross-entropy. Genus and family are the species prediction
  mapped up the taxonomy.
* ``herbarium``: ``train.py`` and ``tta_eval.py`` with every default.
* ``herbarium2020``: the same with ``--recipe herbarium2020`` (the design
  card's recipe).

Herbarium's arms run in this process through the library, from the very
``train.py`` / ``tta_eval.py`` argument lists the harness prints. Each arm
writes ``OUT/<arm>/result.json`` (with its per-image species predictions);
the comparison (``OUT/comparison.json``, ``OUT/comparison.md``) is rebuilt
from every result present, with paired bootstrap intervals of the species
macro-F1 margins, so arms run separately with ``--only`` share one table.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from herbarium import train_cli
from herbarium.checkpoint import load_checkpoint
from herbarium.config import DataConfig, TrainConfig
from herbarium.data.readers import read_split
from herbarium.engine import train
from herbarium.evaluation import cli as eval_cli
from herbarium.evaluation.metrics import BOOTSTRAP_RESAMPLES, evaluate_predictions, paired_bootstrap
from herbarium.evaluation.runner import evaluate, load_run
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.provenance import package_versions, version_changes
from herbarium.run_dir import RunDir
from herbarium.runtime import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
import stock  # noqa: E402  (bench/stock.py)

ARMS: dict[str, str] = {
    "stock_ce": "stock timm script (bench/stock.py): cross-entropy, last epoch, one centre-crop view",
    "stock_la": "stock timm script (bench/stock.py): logit-adjusted cross-entropy (tau 1), last epoch, one view",
    "herbarium": "train.py and tta_eval.py with every default",
    "herbarium2020": "train.py --recipe herbarium2020 (the card's recipe), tta_eval.py defaults",
}
STOCK_LOSSES: dict[str, str] = {"stock_ce": "ce", "stock_la": "la"}
RECIPES: dict[str, str] = {"herbarium": "default", "herbarium2020": "herbarium2020"}
SHOT_GROUPS = ("many", "medium", "few")
# Config fields ("section.field") that define the shared budget: --herbarium-args may not change them.
BUDGET_FIELDS = ("data.data", "data.train_split", "data.val_split", "data.size", "data.batch_size", "model.trunk",
                 "model.pretrained", "optim.accum_steps", "epochs", "seed")


@dataclass(frozen=True)
class Budget:
    """What every arm shares (the one source of the harness's defaults)."""

    data: str = ""
    train_split: str = "train_lt"
    val_split: str | None = "val"  # None: no validation split (herbarium then trains on every image)
    test_split: str = "test"
    trunk: str = "efficientnet_lite0"
    pretrained: bool = True
    size: int = 128
    epochs: int = 30
    batch_size: int = DataConfig().batch_size  # herbarium's default; every arm drops the short last batch
    seed: int = 0
    workers: int | None = None  # None: all cores
    device: str = "auto"


@dataclass
class Arm:
    """One contender: the train.py / tta_eval.py argument lists of a herbarium arm, or a stock recipe."""

    name: str
    description: str
    train_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    stock: stock.StockRecipe | None = None

    @property
    def train(self) -> TrainConfig:
        return train_cli.config_from_args(train_cli.parse_train_args(train_cli.build_parser(), self.train_args))

    @property
    def evaluation(self) -> EvaluationSettings:
        return eval_cli.settings_from_args(eval_cli.build_parser().parse_args(self.eval_args))


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


# ------------------------------------------------------------------ configs
def herbarium_train_args(budget: Budget, run_dir: Path, recipe: str, extra_args: Sequence[str] = ()) -> list[str]:
    """train.py's arguments: the budget, the run folder and the recipe; every other setting its default."""
    args = [str(budget.data), "--train-split", budget.train_split, "--trunk", budget.trunk, "--size", str(budget.size),
            "--epochs", str(budget.epochs), "--batch-size", str(budget.batch_size), "--seed", str(budget.seed),
            "--device", budget.device, "--out", str(run_dir)]
    args += ["--val-split", budget.val_split] if budget.val_split else []
    args += ["--pretrained" if budget.pretrained else "--no-pretrained"]
    args += ["--workers", str(budget.workers)] if budget.workers is not None else []
    args += ["--recipe", recipe] if recipe != "default" else []
    if not extra_args:
        return args
    parse = lambda argv: train_cli.parse_train_args(train_cli.build_parser(), argv)  # noqa: E731
    changed = parse([*args, *extra_args])
    if changed.resume or changed.overwrite:
        raise ValueError("--herbarium-args may not hold --resume or --overwrite; pass --overwrite to the harness")
    before, after = (flat_config(train_cli.config_from_args(parse(argv))) for argv in (args, [*args, *extra_args]))
    moved = [name for name in ("out", *BUDGET_FIELDS) if after[name] != before[name]]
    if moved:
        raise ValueError(f"--herbarium-args may not change the shared budget or the run folder: {moved}; "
                         "set them with the harness's own options")
    return [*args, *extra_args]


def herbarium_eval_args(budget: Budget, paths: ArmPaths) -> list[str]:
    """tta_eval.py's arguments: the run, the test split and the output folder; every other setting its default."""
    args = [str(paths.run), "--data", str(budget.data), "--split", budget.test_split, "--out", str(paths.evaluation),
            "--seed", str(budget.seed), "--device", budget.device]
    return args + (["--workers", str(budget.workers)] if budget.workers is not None else [])


def stock_recipe(budget: Budget, loss: str) -> stock.StockRecipe:
    workers = budget.workers if budget.workers is not None else stock.StockRecipe().workers
    return stock.StockRecipe(size=budget.size, epochs=budget.epochs, batch_size=budget.batch_size, loss=loss,
                             seed=budget.seed, workers=workers)


def check_stock_budget(budget: Budget) -> None:
    if budget.trunk != "efficientnet_lite0" or not budget.pretrained:
        raise ValueError("the stock arms are tf_efficientnet_lite0 with its packaged ImageNet weights; "
                         "with another trunk run --only herbarium,herbarium2020")


def build_arms(budget: Budget, out: Path, names: Sequence[str] = tuple(ARMS),
               herbarium_args: Sequence[str] = ()) -> dict[str, Arm]:
    """The arms to run, in ``ARMS`` order; ``herbarium_args`` go to the herbarium arms' train.py."""
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    arms = {}
    for name in (name for name in ARMS if name in names):
        paths = ArmPaths(out / name)
        if name in STOCK_LOSSES:
            check_stock_budget(budget)
            arms[name] = Arm(name, ARMS[name], stock=stock_recipe(budget, STOCK_LOSSES[name]))
        else:
            arms[name] = Arm(name, ARMS[name], herbarium_train_args(budget, paths.run, RECIPES[name], herbarium_args),
                             herbarium_eval_args(budget, paths))
    return arms


def check_arguments(arm: Arm) -> None:
    """Parse a herbarium arm's train.py and tta_eval.py arguments, which raises on any they refuse."""
    arm.train
    arm.evaluation


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


def arm_commands(arm: Arm, budget: Budget) -> list[str]:
    """The shell commands that run the same arm from the command line."""
    if arm.stock is not None:
        recipe = arm.stock
        return ["python bench/stock.py " + shlex.join([
            "--data", str(budget.data), "--train-split", budget.train_split, "--test-split", budget.test_split,
            "--loss", recipe.loss, "--size", str(recipe.size), "--epochs", str(recipe.epochs),
            "--batch-size", str(recipe.batch_size), "--seed", str(recipe.seed),
            "--workers", str(recipe.workers), "--device", budget.device])]
    return ["python train.py " + shlex.join(arm.train_args), "python tta_eval.py " + shlex.join(arm.eval_args)]


# -------------------------------------------------------------------- runs
def hardware_description(device: str) -> str:
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


def finest_truth(split, taxonomy) -> dict[str, int]:
    """image id (as text) -> true class index at the finest rank."""
    finest = taxonomy.finest
    return {str(s.image_id): taxonomy.targets(s.category_id, [finest])[finest] for s in split.samples}


def run_stock_arm(arm: Arm, budget: Budget) -> dict[str, Any]:
    """Train and score one stock arm; its part of the result record."""
    outcome = stock.run_stock(budget.data, budget.train_split, budget.test_split, arm.stock, device=budget.device)
    taxonomy, test = outcome["taxonomy"], outcome["test"]
    truth = {rank: np.array([taxonomy.targets(s.category_id, [rank])[rank] for s in test.samples]) for rank in taxonomy.ranks}
    ranks = evaluate_predictions(truth, outcome["predictions"], outcome["top"], taxonomy,
                                 {rank: np.asarray(c) for rank, c in outcome["train_counts"].items()})
    finest = outcome["predictions"][taxonomy.finest]
    return {"variant": "single_view_heads", "metrics": summarise_variant(ranks), "variants": {},
            "per_image": {str(s.image_id): int(p) for s, p in zip(test.samples, finest)},
            "truth": {str(s.image_id): int(t) for s, t in zip(test.samples, truth[taxonomy.finest])},
            "seconds": outcome["seconds"], "recipe": dataclasses.asdict(arm.stock),
            "batch_size": arm.stock.batch_size, "optimizer_steps": outcome["optimizer_steps"]}


def run_herbarium_arm(arm: Arm, budget: Budget, paths: ArmPaths, overwrite: bool) -> dict[str, Any]:
    """train.py then tta_eval.py of one herbarium arm, in this process; its part of the result record."""
    cfg = arm.train
    started = time.perf_counter()
    train(cfg, overwrite=overwrite)
    train_seconds = time.perf_counter() - started
    part = score_run(paths.run, budget, paths.evaluation, arm.evaluation)
    part["seconds"]["train"] = train_seconds
    return {**part, "train_config": cfg.to_dict(), "batch_size": cfg.data.batch_size * cfg.optim.accum_steps,
            "optimizer_steps": load_checkpoint(RunDir(paths.run).last)["run"]["global_step"]}


def score_run(run: Path, budget: Budget, out: Path, settings: EvaluationSettings) -> dict[str, Any]:
    """tta_eval.py of a trained run on the budget's test split into ``out``; its part of the result record."""
    started = time.perf_counter()
    evaluation = evaluate([run], budget.data, budget.test_split, None, out, settings)
    seconds = {"evaluate": time.perf_counter() - started}
    metrics = evaluation["metrics"]
    if "variants" not in metrics:
        raise ValueError(f"split {budget.test_split!r} of {budget.data} has no labels to score against")
    taxonomy = load_run(run, torch.device("cpu")).taxonomy
    test = read_split(budget.data, budget.test_split, taxonomy.ranks, taxonomy=taxonomy)
    predictions = pd.read_csv(out / "predictions.csv", dtype={"image_id": str})
    finest = taxonomy.finest
    per_image = {row.image_id: taxonomy.targets(_category(row.category_id), [finest])[finest]
                 for row in predictions.itertuples()}
    return {"variant": metrics["primary"], "primary_choice": metrics.get("primary_choice"),
            "metrics": summarise_variant(metrics["variants"][metrics["primary"]]),
            "variants": {name: summarise_variant(ranks) for name, ranks in metrics["variants"].items()},
            "per_image": per_image, "truth": finest_truth(test, taxonomy), "seconds": seconds,
            "evaluation_settings": dataclasses.asdict(settings),
            "eval_images_per_s": metrics["throughput"]["images_per_s"]}


def _category(value: Any) -> Any:
    """predictions.csv's category ids are read back as numbers where they were numbers."""
    return int(value) if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()) else value


def run_arm(arm: Arm, budget: Budget, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Train and score one arm; writes and returns its result record."""
    paths = ArmPaths(out / arm.name)
    commands = arm_commands(arm, budget)
    print(f"\n== {arm.name}: {arm.description}\n" + "\n".join(commands), flush=True)
    if paths.result.is_file() and not overwrite:
        raise FileExistsError(f"{paths.result} exists; pass --overwrite to run {arm.name} again")
    paths.root.mkdir(parents=True, exist_ok=True)
    load_before = _load_average()
    part = run_stock_arm(arm, budget) if arm.stock is not None else run_herbarium_arm(arm, budget, paths, overwrite)
    part["seconds"]["total"] = sum(part["seconds"].values())
    record = {
        "arm": arm.name, "description": arm.description, **part, "hardware": hardware_description(budget.device),
        "load_average": {"start": load_before, "end": _load_average()},  # other jobs on the machine slow the wall times
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "budget": dataclasses.asdict(budget),
        "commands": commands, "packages": package_versions(),
    }
    paths.result.write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------- intervals
def aligned(result: dict[str, Any], other: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, predictions of ``result``, predictions of ``other``) over the image ids both scored."""
    ids = sorted(set(result["per_image"]) & set(other["per_image"]))
    return (np.array([result["truth"][i] for i in ids]), np.array([result["per_image"][i] for i in ids]),
            np.array([other["per_image"][i] for i in ids]))


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
        row = {"arm": name, "variant": result["variant"], "batch": result.get("batch_size"),
               "steps": result.get("optimizer_steps")}
        row.update({title: result["metrics"][rank][key] for title, rank, key in columns})
        row["wall_minutes"] = result["seconds"]["total"] / 60
        rows.append(row)
    return {"ranks": ranks, "columns": [title for title, _, _ in columns], "rows": rows, "margins": margins(results, ranks)}


def margins(results: dict[str, dict[str, Any]], ranks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each herbarium arm's margin over each stock arm: macro-F1 differences per rank, and for the
    finest rank a paired bootstrap interval over the test images."""
    ours = [name for name in results if name not in STOCK_LOSSES]
    theirs = [name for name in results if name in STOCK_LOSSES]
    table = {}
    for name in ours:
        for baseline in theirs:
            a, b = results[name], results[baseline]
            entry = {rank: a["metrics"][rank]["macro_f1"] - b["metrics"][rank]["macro_f1"] for rank in ranks}
            if "per_image" in a and "per_image" in b:
                entry["finest_interval"] = paired_bootstrap(*aligned(a, b))
            table[f"{name} - {baseline}"] = entry
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def _interval(entry: dict[str, Any]) -> str:
    interval = entry.get("finest_interval")
    return "-" if not interval else f"{interval['delta']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def render_markdown(table: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    first = next(iter(results.values()))
    budget = first["budget"]
    finest = table["ranks"][0]
    thresholds = first["metrics"][finest]["shot_thresholds"] or (None, None)
    validation = budget["val_split"] or f"none (herbarium trains on every image of {budget['train_split']})"
    lines = [
        f"# Accuracy: herbarium against the stock timm script ({Path(budget['data']).name}, "
        f"{budget['train_split']} -> {budget['test_split']})", "",
        f"Budget: {budget['trunk']} ({'pretrained' if budget['pretrained'] else 'random init'}), {budget['size']} px, "
        f"{budget['epochs']} epochs, batch {budget.get('batch_size', '-')} (short last batch dropped), seed {budget['seed']}; "
        f"validation split: {validation}.",
        f"Hardware: {first['hardware']}. Date: {max(r['date'] for r in results.values())}.", "",
    ]
    header = ["arm", "variant", "batch", "steps", *table["columns"], "wall (min)"]
    rows = [[row["arm"], row["variant"], row["batch"], row["steps"], *(row[c] for c in table["columns"]),
             f"{row['wall_minutes']:.1f}"] for row in table["rows"]]
    lines += _markdown_table(header, rows)
    lines += ["", f"Shot groups: {finest} classes by training images of {budget['train_split']}: "
              f"few < {thresholds[0]} <= medium <= {thresholds[1]} < many. The stock arms' genus and family are the "
              f"ancestors of their {finest} prediction."]
    if table["margins"]:
        lines += ["", f"Macro-F1 margins (herbarium arm - stock arm); {finest}: difference with a 95% paired bootstrap "
                  f"interval over the test images ({BOOTSTRAP_RESAMPLES} resamples):", ""]
        lines += _markdown_table(["arms", *table["ranks"], f"{finest} interval"],
                                 [[pair, *(entry[r] for r in table["ranks"]), _interval(entry)]
                                  for pair, entry in table["margins"].items()])
    for name in (name for name in results if results[name].get("variants")):
        variants = results[name]["variants"]
        choice = results[name].get("primary_choice") or {}
        lines += ["", f"{name}: evaluation variants (primary {results[name]['variant']}: {choice.get('reason', '-')}):", ""]
        header = ["variant", *(f"{rank} macro-F1" for rank in table["ranks"]), *(f"{rank} top-1" for rank in table["ranks"])]
        rows = [[variant, *(v[r]["macro_f1"] for r in table["ranks"]), *(v[r]["top1"] for r in table["ranks"])]
                for variant, v in variants.items() if all(r in v for r in table["ranks"])]
        lines += _markdown_table(header, rows)

    def load(result: dict[str, Any], when: str) -> str:
        value = (result.get("load_average") or {}).get(when)
        return "-" if value is None else f"{value:.1f}"

    lines += ["", "Wall time per stage (s), with the machine's 1-minute load average:", ""]
    lines += _markdown_table(["arm", "train", "evaluate", "total", "load avg start/end"],
                             [[name, *(f"{r['seconds'][k]:.0f}" for k in ("train", "evaluate", "total")),
                               f"{load(r, 'start')} / {load(r, 'end')}"] for name, r in results.items()])
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
    summary = {name: {k: v for k, v in r.items() if k not in ("per_image", "truth")} for name, r in results.items()}
    (out / "comparison.json").write_text(json.dumps({"table": table, "results": summary}, indent=2))
    (out / "comparison.md").write_text(render_markdown(table, results))
    return table


# ------------------------------------------------------------------- seeds
def load_seed_results(out: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """{seed: {arm: result}} from ``OUT/s<seed>/<arm>/result.json``."""
    return {int(folder.name[1:]): load_results(folder) for folder in sorted(out.glob("s[0-9]*")) if load_results(folder)}


def seed_summary(by_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: macro-F1 per rank as mean, standard deviation and per-seed values; per seed: each herbarium arm's
    margins over each stock arm (every rank, and the finest rank's paired bootstrap interval)."""
    first = next(iter(next(iter(by_seed.values())).values()))
    ranks = ranks_fine_to_coarse({"any": first})
    arms = [name for name in ARMS if any(name in results for results in by_seed.values())]
    rows = []
    for arm in arms:
        seeds = sorted(seed for seed, results in by_seed.items() if arm in results)
        row: dict[str, Any] = {"arm": arm, "seeds": seeds,
                               "batch": by_seed[seeds[0]][arm].get("batch_size"),
                               "steps": by_seed[seeds[0]][arm].get("optimizer_steps")}
        for rank in ranks:
            scores = [by_seed[seed][arm]["metrics"][rank]["macro_f1"] for seed in seeds]
            row[rank] = {"mean": float(np.mean(scores)), "per_seed": scores,
                         "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None}
        rows.append(row)
    per_seed_margins = {seed: margins(results, ranks) for seed, results in sorted(by_seed.items())}
    return {"ranks": ranks, "budget": first["budget"], "hardware": first["hardware"], "rows": rows,
            "margins": per_seed_margins}


def render_seed_summary(summary: dict[str, Any]) -> str:
    budget, ranks = summary["budget"], summary["ranks"]
    lines = [f"# Accuracy over seeds ({Path(budget['data']).name}, {budget['train_split']} -> {budget['test_split']})", "",
             f"Budget: {budget['trunk']} ({'pretrained' if budget['pretrained'] else 'random init'}), {budget['size']} px, "
             f"{budget['epochs']} epochs, batch {budget.get('batch_size', '-')}; hardware: {summary['hardware']}.",
             "Macro-F1 of each arm's headline variant, mean ± standard deviation over seeds.", ""]
    header = ["arm", "seeds", "batch", "steps", *(f"{rank} macro-F1" for rank in ranks)]
    cells = lambda e: f"{e['mean']:.3f}" + (f" ± {e['std']:.3f}" if e["std"] is not None else "")  # noqa: E731
    lines += _markdown_table(header, [[row["arm"], ",".join(map(str, row["seeds"])), row["batch"], row["steps"],
                                       *(cells(row[rank]) for rank in ranks)] for row in summary["rows"]])
    lines += ["", f"Margins per seed (herbarium arm - stock arm): every rank, and {ranks[0]} with its 95% paired "
              "bootstrap interval over the test images:", ""]
    rows = [[seed, pair, *(entry[rank] for rank in ranks), _interval(entry)]
            for seed, pairs in summary["margins"].items() for pair, entry in pairs.items()]
    lines += _markdown_table(["seed", "arms", *ranks, f"{ranks[0]} interval"], rows)
    return "\n".join(lines) + "\n"


def write_seed_summary(out: Path) -> dict[str, Any]:
    """OUT/seeds.json and OUT/seeds.md from every seed's results under OUT/s<seed>/."""
    summary = seed_summary(load_seed_results(out))
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    (out / "seeds.md").write_text(render_seed_summary(summary))
    return summary


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
                      help=f"validation split of the herbarium arms; 'none' for none (default: {B.val_split})")
    data.add_argument("--test-split", default=B.test_split, help=f"labelled split that is scored (default: {B.test_split})")
    budget = parser.add_argument_group("shared budget")
    budget.add_argument("--trunk", default=B.trunk, help=f"timm trunk (default: {B.trunk})")
    budget.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=B.pretrained,
                        help=f"start from the trunk's packaged ImageNet weights (default: {B.pretrained})")
    budget.add_argument("--size", type=int, default=B.size, help=f"input side in pixels (default: {B.size})")
    budget.add_argument("--epochs", type=int, default=B.epochs, help=f"epochs (default: {B.epochs})")
    budget.add_argument("--batch-size", type=int, default=B.batch_size,
                        help=f"images per optimizer step of every arm, the short last batch dropped (default: {B.batch_size})")
    budget.add_argument("--seed", type=int, default=B.seed, help=f"seed of every arm (default: {B.seed})")
    budget.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=None,
                        help="comma-separated seeds: each runs into OUT/s<seed>/, and OUT/seeds.md gives mean ± sd and "
                             "the margins per seed (default: --seed only)")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=B.workers, help="decoding processes (default: each arm's own default)")
    run.add_argument("--device", default=B.device, help=f"cpu, cuda or auto (default: {B.device})")
    run.add_argument("--only", type=_arm_names, default=tuple(ARMS), help=f"comma-separated arms to run (default: {','.join(ARMS)})")
    run.add_argument("--herbarium-args", default="", help="extra train.py options for the herbarium arms, written --herbarium-args=\"--sampler sqrt\" (default: none)")
    run.add_argument("--out", default=None, help="output folder (default: bench/results/accuracy_<train-split>)")
    run.add_argument("--overwrite", action="store_true", help="run arms whose result is already in OUT again (default: skip them)")
    return parser


def budget_from_args(args: argparse.Namespace) -> Budget:
    return Budget(data=args.data, train_split=args.train_split, val_split=args.val_split, test_split=args.test_split,
                  trunk=args.trunk, pretrained=args.pretrained, size=args.size, epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed,
                  workers=args.workers, device=args.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or f"bench/results/accuracy_{args.train_split}")
    if args.seeds is None:
        return run_seed(args, out)
    for seed in args.seeds:
        run_seed(argparse.Namespace(**{**vars(args), "seed": seed}), out / f"s{seed}")
        write_seed_summary(out)
    print("\n" + (out / "seeds.md").read_text())
    return 0


def kept_result_caveat(arm_out: Path) -> str:
    """What a kept result's package versions mean for comparing it with arms run now ("" when they match).

    The same arm, seed and code give other numbers under other versions
    (one seed moved by 0.024 species macro-F1 on the CPU), so such a pair
    compares the package sets as much as the arms.
    """
    recorded = json.loads(ArmPaths(arm_out).result.read_text()).get("packages")
    if recorded is None:
        return "; it recorded no package versions: compare it only with arms run under the same ones"
    changes = version_changes(recorded, package_versions())
    return f"; it ran under other package versions ({', '.join(changes)})" if changes else ""


def run_seed(args: argparse.Namespace, out: Path) -> int:
    """Every arm at ``args.seed`` into ``out``; the comparison table written after each arm."""
    budget = budget_from_args(args)
    arms = build_arms(budget, out, args.only, shlex.split(args.herbarium_args))
    for arm in (arm for arm in arms.values() if arm.stock is None):
        check_arguments(arm)  # fail on a config train.py or tta_eval.py refuses before hours of training
    out.mkdir(parents=True, exist_ok=True)
    for arm in arms.values():
        if ArmPaths(out / arm.name).result.is_file() and not args.overwrite:
            print(f"{arm.name}: result present, skipped (--overwrite runs it again){kept_result_caveat(out / arm.name)}")
            continue
        run_arm(arm, budget, out, overwrite=args.overwrite)
        write_comparison(out)
    write_comparison(out)
    print("\n" + (out / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
