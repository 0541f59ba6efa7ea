#!/usr/bin/env python
"""Ablation of herbarium's defaults on validation data: each default put back alone, each lever added alone.

    python bench/ablation.py --data DATA --seeds 0,1,2 --out bench/results/ablation   # the CPU proxy budget

The defaults were chosen against the card's Herbarium 2020 recipe and the
stock timm script. To show what each choice contributes, every setting below
is the herbarium arm of ``bench/accuracy.py`` with one group of defaults set
back to the recipe's value, or with one lever added (EMA, mixup, CutMix, a
lower trunk learning rate), trained on ``--train-split`` with no validation
split (every image trains) and scored on ``--score-split``, never on test.
The stock script's logit-adjusted arm runs beside them as the reference a
user would otherwise have.

Writes the harness's records (``OUT/s<seed>/<setting>/<arm>/result.json``;
a record already present is kept, so an interrupted ablation resumes) and
``OUT/ablation.json`` / ``OUT/ablation.md``: per setting the mean and spread
over seeds of the headline variant's macro-F1 per rank, and per seed the
finest-rank margin to the defaults with a 95% paired bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from herbarium.evaluation.metrics import paired_bootstrap
from herbarium.stats_file import IMAGENET_MEAN, IMAGENET_STD

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
import accuracy  # noqa: E402  (bench/accuracy.py)

IMAGENET_STATS = "{imagenet_stats}"  # placeholder for the ImageNet stats file the ablation writes into OUT
# setting -> (what it changes, extra train.py arguments). Each undoes one group of defaults or adds one lever.
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "defaults": ("every default", []),
    "old_optim": ("Adam 3e-4 halved every 5 epochs, not AdamW 1e-3 with a warm-up and a cosine",
                  ["--optim", "adam:0", "--schedule", "step:5"]),
    "old_norm": ("ImageNet mean/std, not the pretrained weights' own", ["--stats", IMAGENET_STATS]),
    "old_loss": ("class-weighted (effective-number) focal loss, species weighted 1.5, not logit-adjusted CE",
                 ["--loss", "focal", "--class-weights", "effective", "--rank-weights", "species=1.5"]),
    "plain_ce": ("plain cross-entropy, not logit-adjusted", ["--loss", "ce"]),
    "old_dropout": ("dropout 0.5 before the heads (the card's), not none", ["--dropout", "0.5"]),
    "dropout": ("dropout 0.2 before the heads (the default until 2026-12-04), not none", ["--dropout", "0.2"]),
    "holdout": ("a 10% hold-out of train for validation, not every image trained", ["--holdout", "0.1"]),
    # Levers a timm user reaches for, added to the defaults one at a time:
    "ema": ("adds a weight EMA (decay 0.9998 with timm's warm-up), evaluated instead of the weights",
            ["--ema-decay", "0.9998"]),
    "mixup": ("adds mixup (alpha 0.2) with mixed targets at every rank", ["--mixup", "0.2"]),
    "cutmix": ("adds CutMix (alpha 1.0) with mixed targets at every rank", ["--cutmix", "1.0"]),
    "trunk_lr": ("trains the pretrained trunk at 0.1x the heads' learning rate", ["--trunk-lr-scale", "0.1"]),
    "layer_decay": ("layer-wise lr decay 0.9: the trunk's last layer at the heads' rate, each earlier one 0.9x slower",
                    ["--layer-decay", "0.9"]),
    "trivial": ("adds TrivialAugmentWide after the crop and flip", ["--augment", "crop_flip_trivial"]),
    "randaugment": ("adds RandAugment (2 ops, magnitude 9) after the crop and flip", ["--augment", "crop_flip_randaugment"]),
    "erasing": ("adds RandomErasing (p 0.5) after the crop and flip", ["--augment", "crop_flip_erasing"]),
    "species_only": ("a species head alone (genus and family read off the tree)", ["--levels", "species"]),
    "gem": ("generalized-mean pooling (p learned from 3), not average pooling", ["--pool", "gem"]),
    "drop_path": ("stochastic depth 0.1 in the trunk", ["--drop-path", "0.1"]),
    "tree": ("tree logits: each parent's logits added to its children's", ["--tree-logits"]),
    "coarse_light": ("the coarser ranks' losses weighted 0.5 (genus) and 0.25 (family), species 1",
                     ["--rank-weights", "genus=0.5,family=0.25"]),
}
REFERENCE_ARM = "stock_la"
PROXY = {"size": 64, "epochs": 10}  # the CPU proxy budget of BENCHMARKS.md


def setting_args(name: str, out: Path) -> list[str]:
    """The extra train.py arguments of setting ``name``, with the ImageNet stats file written under ``out``."""
    args = ABLATIONS[name][1]
    if IMAGENET_STATS not in args:
        return list(args)
    stats = out / "imagenet_stats.json"
    stats.parent.mkdir(parents=True, exist_ok=True)
    stats.write_text(json.dumps({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}))
    return [str(stats) if arg == IMAGENET_STATS else arg for arg in args]


def harness_argv(args: argparse.Namespace, seed: int, setting: str) -> list[str]:
    """bench/accuracy.py's arguments for one setting (or the stock reference) at one seed."""
    out = Path(args.out)
    argv = ["--data", args.data, "--train-split", args.train_split, "--val-split", "none",
            "--test-split", args.score_split, "--size", str(args.size), "--epochs", str(args.epochs),
            "--seed", str(seed), "--device", args.device, "--out", str(out / f"s{seed}" / setting)]
    argv += ["--workers", str(args.workers)] if args.workers is not None else []
    if setting == REFERENCE_ARM:
        return [*argv, "--only", REFERENCE_ARM]
    return [*argv, "--only", "herbarium", f"--herbarium-args={shlex.join(setting_args(setting, out))}"]


# ----------------------------------------------------------------- summary
def load_records(out: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """{seed: {setting: the harness's result record}} for every record under ``out``."""
    records: dict[int, dict[str, dict[str, Any]]] = {}
    for path in sorted(out.glob("s*/*/*/result.json")):
        seed, setting = int(path.parents[2].name[1:]), path.parents[1].name
        records.setdefault(seed, {})[setting] = json.loads(path.read_text())
    return records


def summarise(records: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per setting: macro-F1 per rank (mean, standard deviation, per seed) and the finest-rank margin to the
    defaults of the same seed, with its paired bootstrap interval."""
    first = next(iter(next(iter(records.values())).values()))
    ranks = accuracy.ranks_fine_to_coarse({"any": first})
    settings = [name for name in (*ABLATIONS, REFERENCE_ARM) if any(name in by_setting for by_setting in records.values())]
    rows = []
    for setting in settings:
        seeds = sorted(seed for seed, by_setting in records.items() if setting in by_setting)
        row: dict[str, Any] = {"setting": setting, "seeds": seeds, "variants": {}, "margins": {}}
        for rank in ranks:
            scores = [records[seed][setting]["metrics"][rank]["macro_f1"] for seed in seeds]
            row[rank] = {"mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
                         "per_seed": scores}
        for seed in seeds:
            record, defaults = records[seed][setting], records[seed].get("defaults")
            row["variants"][seed] = record["variant"]
            if defaults is not None and "per_image" in record and "per_image" in defaults:
                row["margins"][seed] = paired_bootstrap(*accuracy.aligned(record, defaults))
        rows.append(row)
    return {"ranks": ranks, "budget": first["budget"], "hardware": first["hardware"], "rows": rows}


def _mean_std(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.3f}" + (f" ± {entry['std']:.3f}" if entry["std"] is not None else "")


def render_markdown(summary: dict[str, Any]) -> str:
    budget, ranks, finest = summary["budget"], summary["ranks"], summary["ranks"][0]
    lines = [f"# Ablation of the defaults ({Path(budget['data']).name}, {budget['train_split']} -> {budget['test_split']})",
             "", f"Budget: {budget['trunk']} ({'pretrained' if budget['pretrained'] else 'random init'}), "
             f"{budget['size']} px, {budget['epochs']} epochs; hardware: {summary['hardware']}.",
             f"Macro-F1 of each run's headline variant, mean ± standard deviation over seeds; {finest} margin to the "
             "defaults per seed with its 95% paired bootstrap interval.", ""]
    header = ["setting", "what it changes", "seeds", *(f"{rank} macro-F1" for rank in ranks), f"{finest} - defaults"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        what = ABLATIONS[row["setting"]][0] if row["setting"] in ABLATIONS else accuracy.ARMS[row["setting"]]
        margins = "; ".join(f"{m['delta']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]" for m in row["margins"].values())
        cells = [row["setting"], what, ",".join(map(str, row["seeds"])), *(_mean_std(row[rank]) for rank in ranks),
                 margins if row["setting"] != "defaults" else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> dict[str, Any]:
    records = load_records(out)
    if not records:
        raise FileNotFoundError(f"no ablation record under {out}")
    summary = summarise(records)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    (out / "ablation.md").write_text(render_markdown(summary))
    return summary


# --------------------------------------------------------------------- cli
def _names(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in (*ABLATIONS, REFERENCE_ARM)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown setting(s) {unknown or value!r}; "
                                         f"choose from {', '.join((*ABLATIONS, REFERENCE_ARM))}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder with a training and a labelled validation split")
    parser.add_argument("--train-split", default="train_lt", help="training split")
    parser.add_argument("--score-split", default="val", help="labelled split that is scored (never the test split)")
    parser.add_argument("--size", type=int, default=PROXY["size"], help="input side in pixels")
    parser.add_argument("--epochs", type=int, default=PROXY["epochs"], help="epochs")
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0, 1, 2],
                        help="comma-separated seeds")
    parser.add_argument("--settings", type=_names, default=[*ABLATIONS, REFERENCE_ARM], help="settings to run")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: each arm's own)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--out", default="bench/results/ablation", help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for seed in args.seeds:
        for setting in args.settings:
            accuracy.main(harness_argv(args, seed, setting))
            write_summary(Path(args.out))
    print("\n" + (Path(args.out) / "ablation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
