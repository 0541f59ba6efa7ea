"""Cross-prediction label cleaning (the AliProducts recipe).

``herbarium clean-labels DATA --folds 2 --out CLEAN [train options]``:

1. split the training split in ``folds`` parts stratified by species and
   train one model per part's complement (:mod:`herbarium.kfold`; two folds:
   train on each half, predict the other);
2. keep the images whose out-of-fold prediction agrees with their label;
   the others go to ``CLEAN/flagged.csv`` (most confident disagreement first)
   for a person to review;
3. build a class-balanced clean subset, ``CLEAN/kept.csv``: per class the
   ``--keep-per-class`` agreeing images with the highest predicted
   probability of their label (AliProducts kept 3; 0 keeps every agreeing
   image). A class none of whose images agree keeps its single most probable
   image (``kept_because = class_cover``), so the subset still covers every
   class; images of classes too small to be split across the folds were never
   checked and are all kept (``too_few_to_check``);
4. optionally (``--finetune-epochs N``) train ``CLEAN/finetune`` on the kept
   subset, starting from the trunk of ``--finetune-from CHECKPOINT``.

Both CSVs have image_id, label, predicted (category ids), probability (of the
prediction), label_probability, label_name and predicted_name.
``--known-noise FILE`` (an image_id CSV of labels known to be wrong, such as
``inject-label-noise``'s answer key) prints the precision and recall of the
flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from herbarium.arguments import ArgumentParser
from herbarium.config import TrainConfig
from herbarium.data.splits import read_image_ids
from herbarium.engine import train
from herbarium.errors import command
from herbarium.evaluation.tta import parse_views
from herbarium.kfold import add_kfold_arguments, run_kfold
from herbarium.train_cli import add_train_arguments, config_from_args, parse_train_args

KEEP_PER_CLASS = 3  # AliProducts kept 3 images per class
COLUMNS = ["image_id", "label", "predicted", "probability", "label_probability", "label_name", "predicted_name"]


def split_by_agreement(oof: pd.DataFrame, keep_per_class: int, folds: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, flagged) from out-of-fold predictions (see the module docstring).

    Args:
        oof: one row per checked image with the ``COLUMNS``.
        keep_per_class: agreeing images kept per class, best first; 0 keeps all.
        folds: ``folds.csv`` (image_id, category_id, fold); its fold -1 images
            (never checked) are added to the kept subset.
    """
    if keep_per_class < 0:
        raise ValueError(f"keep_per_class must be >= 0 (0 keeps every agreeing image), got {keep_per_class}")
    agrees = oof["label"].astype(str) == oof["predicted"].astype(str)
    flagged = oof.loc[~agrees, COLUMNS].sort_values("probability", ascending=False, kind="stable")
    ranked = oof.loc[agrees, COLUMNS].sort_values("label_probability", ascending=False, kind="stable")
    kept = ranked.groupby(ranked["label"].astype(str), sort=False).head(keep_per_class) if keep_per_class else ranked
    kept = kept.assign(kept_because="agrees")
    covered = set(kept["label"].astype(str))
    uncovered = oof[~oof["label"].astype(str).isin(covered)]
    cover = (uncovered.sort_values("label_probability", ascending=False, kind="stable")
             .groupby(uncovered["label"].astype(str), sort=False).head(1))
    parts = [kept, cover[COLUMNS].assign(kept_because="class_cover")]
    if folds is not None:
        unchecked = folds[folds["fold"] < 0]
        if len(unchecked):
            parts.append(pd.DataFrame({"image_id": unchecked["image_id"], "label": unchecked["category_id"],
                                       "kept_because": "too_few_to_check"}))
    kept = pd.concat([part for part in parts if len(part)], ignore_index=True)
    return kept, flagged.reset_index(drop=True)


def detection_scores(flagged_ids: Sequence[Any], noisy_ids: Sequence[Any]) -> dict[str, float]:
    """Precision and recall of flagged image ids against the ids whose labels are known to be wrong."""
    flagged, noisy = {str(i) for i in flagged_ids}, {str(i) for i in noisy_ids}
    hits = len(flagged & noisy)
    return {"flagged": len(flagged), "noisy": len(noisy), "found": hits,
            "precision": hits / len(flagged) if flagged else float("nan"),
            "recall": hits / len(noisy) if noisy else float("nan")}


def clean_labels(cfg: TrainConfig, folds: int = 2, keep_per_class: int = KEEP_PER_CLASS, overwrite: bool = False,
                 views: Sequence[str] = ("plain", "flip")) -> dict[str, Any]:
    """Cross-predict ``cfg``'s training split in ``folds`` folds under ``cfg.out``; write kept.csv and flagged.csv."""
    out = Path(cfg.out)
    oof = run_kfold(cfg, folds, overwrite, views)
    kept, flagged = split_by_agreement(oof, keep_per_class, pd.read_csv(out / "folds.csv", dtype={"image_id": str}))
    kept.to_csv(out / "kept.csv", index=False)
    flagged.to_csv(out / "flagged.csv", index=False)
    return {"checked": len(oof), "flagged": len(flagged), "kept": len(kept), "kept_csv": out / "kept.csv",
            "flagged_csv": out / "flagged.csv", "flagged_ids": flagged["image_id"].tolist()}


def finetune_config(cfg: TrainConfig, kept_csv: Path, epochs: int, start_from: str | None) -> TrainConfig:
    """The config of the fine-tuning run: ``cfg`` on the kept subset, in ``<out>/finetune``."""
    model = dataclasses.replace(cfg.model, weights=start_from, pretrained=False) if start_from else cfg.model
    return dataclasses.replace(cfg, out=str(Path(cfg.out) / "finetune"), epochs=epochs, model=model,
                               data=dataclasses.replace(cfg.data, subset=str(kept_csv)))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="herbarium clean-labels", description="Train on part of the training split, predict the rest, "
                                     "flag labels the prediction disagrees with (flagged.csv) and write a class-balanced clean subset (kept.csv).")
    add_kfold_arguments(add_train_arguments(parser), default_folds=2)
    group = parser.add_argument_group("cleaning")
    group.add_argument("--keep-per-class", type=int, default=KEEP_PER_CLASS, help=f"agreeing images kept per class, highest label probability first; 0 keeps all (default: {KEEP_PER_CLASS})")
    group.add_argument("--known-noise", default=None, help="CSV whose image_id column lists labels known to be wrong: print the flags' precision and recall (default: none)")
    group.add_argument("--finetune-epochs", type=int, default=0, help="then train OUT/finetune on kept.csv for this many epochs (default: 0, no fine-tuning)")
    group.add_argument("--finetune-from", default=None, help="checkpoint whose trunk the fine-tuning starts from (default: the train options' start)")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_train_args(parser, argv)
    if args.resume or args.resume_if_exists:
        parser.error("run the same clean-labels command again to continue it; --resume and --resume-if-exists are for single runs")
    cfg = config_from_args(args)
    result = clean_labels(cfg, args.folds, args.keep_per_class, args.overwrite, parse_views(args.oof_views))
    print(f"checked {result['checked']} images: {result['flagged']} flagged ({result['flagged_csv']}), "
          f"{result['kept']} kept in the clean subset ({result['kept_csv']})")
    if args.known_noise:
        scores = detection_scores(result["flagged_ids"], read_image_ids(args.known_noise))
        print(f"against {args.known_noise}: {scores['found']} of {scores['noisy']} wrong labels flagged, "
              f"precision {scores['precision']:.3f}, recall {scores['recall']:.3f}")
    if args.finetune_epochs:
        finetune = finetune_config(cfg, result["kept_csv"], args.finetune_epochs, args.finetune_from)
        train(finetune, overwrite=args.overwrite)
        print(f"fine-tuned on the kept subset: {finetune.out}")
    return 0
