#!/usr/bin/env python
"""Levers after training, on validation data: TTA views, post-hoc logit adjustment, retrieval mixing, cRT/LWS.

    python bench/ablation.py --data DATA --settings defaults --seeds 0,1,2 --out OUT      # trains the runs
    python bench/eval_levers.py OUT --levers plain,multiscale_flip,centroid_25             # scores them again

What is decided at evaluation needs no new training: every ``defaults`` run
of an ablation folder (``OUT/s<seed>/defaults/herbarium/run``) is scored
again on the ablation's own score split (never the test split) once per
lever, with ``tta_eval.py``'s defaults plus the lever's options (``crt``
and ``lws`` first re-balance the run's heads with ``herbarium rebalance``
into ``OUT/s<seed>/eval_levers/<lever>/run`` and score that). The
``default_eval`` lever is the evaluation the ablation itself ran, repeated
here so that every lever is compared with the same code on the same run.

Writes ``OUT/s<seed>/eval_levers/<lever>/result.json`` (kept when present,
so an interrupted run resumes) and ``OUT/eval_levers.json`` /
``OUT/eval_levers.md``: per lever the mean and spread over seeds of the
headline variant's macro-F1 per rank, and per seed the finest-rank margin
to ``default_eval`` with its 95% paired bootstrap interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from herbarium import rebalance
from herbarium.evaluation import cli as eval_cli
from herbarium.evaluation.metrics import paired_bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
import accuracy  # noqa: E402  (bench/accuracy.py)

TRAIN_SPLIT = "{train_split}"  # placeholder for the run's own training split (the retrieval gallery)
BASELINE = "default_eval"
RETRIEVAL_HEADLINE = ["--primary", "retrieval_consistent"]  # the mix is scored, not the heads it is mixed with
# lever -> (what it changes, extra tta_eval.py arguments)
EVAL_LEVERS: dict[str, tuple[str, list[str]]] = {
    BASELINE: ("tta_eval.py's defaults: three seeded training-augmentation views and one plain view", []),
    "plain": ("one plain centre view", ["--views", "plain"]),
    "plain_flip": ("the plain view and its mirror", ["--views", "plain,flip"]),
    "multiscale_flip": ("plain, zoomed out (0.875) and in (1.15), and the mirror: four fixed views",
                        ["--views", "multiscale,flip"]),
    "fivecrop_flip": ("five crops and the mirror", ["--views", "fivecrop+flip"]),
    "tau_25": ("post-hoc logit adjustment: 0.25 x log prior subtracted from every rank's logits",
               ["--posthoc-tau", "0.25"]),
    "tau_50": ("post-hoc logit adjustment at 0.5", ["--posthoc-tau", "0.5"]),
    "crt": ("cRT: every head re-trained on the frozen trunk's features with class-balanced draws "
            "(herbarium rebalance --method crt), then tta_eval.py's defaults", []),
    "lws": ("LWS: one learned scale per class of every head (herbarium rebalance --method lws)", []),
    "centroid_25": ("class centroids of the training images mixed into the finest rank at weight 0.25",
                    [*RETRIEVAL_HEADLINE, "--retrieval-gallery", TRAIN_SPLIT, "--retrieval-weight", "0.25"]),
    "centroid_50": ("class centroids of the training images mixed in at weight 0.5",
                    [*RETRIEVAL_HEADLINE, "--retrieval-gallery", TRAIN_SPLIT, "--retrieval-weight", "0.5"]),
    "knn_25": ("a vote of the 5 nearest training images mixed in at weight 0.25",
               [*RETRIEVAL_HEADLINE, "--retrieval-gallery", TRAIN_SPLIT, "--retrieval-mode", "knn", "--retrieval-weight",
                "0.25"]),
}

# levers that re-balance the run's heads first (herbarium rebalance's method, its other settings default) and
# score the new run
REBALANCED: dict[str, str] = {"crt": "crt", "lws": "lws"}


def lever_args(name: str, budget: accuracy.Budget) -> list[str]:
    """tta_eval.py's arguments for lever ``name`` on a run trained under ``budget``."""
    return [budget.train_split if arg == TRAIN_SPLIT else arg for arg in EVAL_LEVERS[name][1]]


def trained_runs(out: Path) -> dict[int, tuple[Path, accuracy.Budget]]:
    """{seed: (the ``defaults`` run, its budget)} of an ablation folder."""
    runs = {}
    for record_path in sorted(out.glob("s*/defaults/herbarium/result.json")):
        record = json.loads(record_path.read_text())
        runs[int(record_path.parents[2].name[1:])] = (record_path.parent / "run", accuracy.Budget(**record["budget"]))
    if not runs:
        raise FileNotFoundError(f"no trained defaults run under {out}/s*/defaults/herbarium")
    return runs


def score_lever(run: Path, budget: accuracy.Budget, lever: str, out: Path) -> dict[str, Any]:
    """The harness's result record of ``run`` scored with ``lever``, written to ``out/result.json``."""
    result = out / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    if lever in REBALANCED:
        run = rebalanced_run(run, budget, REBALANCED[lever], out / "run")
    argv = [str(run), "--data", budget.data, "--split", budget.test_split, "--out", str(out / "eval"),
            "--seed", str(budget.seed), "--device", budget.device, *lever_args(lever, budget)]
    argv += ["--workers", str(budget.workers)] if budget.workers is not None else []
    print(f"\n== seed {budget.seed}, {lever}: python tta_eval.py {' '.join(argv)}", flush=True)
    settings = eval_cli.settings_from_args(eval_cli.build_parser().parse_args(argv))
    record = {"lever": lever, "description": EVAL_LEVERS[lever][0], "budget": dataclasses.asdict(budget),
              **accuracy.score_run(run, budget, out / "eval", settings)}
    result.write_text(json.dumps(record, indent=2))
    return record


def rebalanced_run(run: Path, budget: accuracy.Budget, method: str, out: Path) -> Path:
    """``run`` with its heads re-balanced into ``out`` (kept when already written)."""
    if not (out / "checkpoints").is_dir():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted attempt
        settings = rebalance.RebalanceSettings(method=method, seed=budget.seed, device=budget.device,
                                               workers=budget.workers)
        print(f"\n== seed {budget.seed}: herbarium rebalance {run} --method {method} --seed {budget.seed} --out {out}")
        rebalance.rebalance(run, out, settings)
    return out


# ----------------------------------------------------------------- summary
def summarise(records: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per lever: macro-F1 per rank (mean, sd, per seed) and the finest-rank margin to the baseline per seed."""
    first = next(iter(next(iter(records.values())).values()))
    ranks = accuracy.ranks_fine_to_coarse({"any": first})
    rows = []
    for lever in (name for name in EVAL_LEVERS if any(name in by_lever for by_lever in records.values())):
        seeds = sorted(seed for seed, by_lever in records.items() if lever in by_lever)
        row: dict[str, Any] = {"lever": lever, "seeds": seeds, "margins": {}}
        for rank in ranks:
            scores = [records[seed][lever]["metrics"][rank]["macro_f1"] for seed in seeds]
            row[rank] = {"mean": float(np.mean(scores)), "per_seed": scores,
                         "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None}
        for seed in seeds:
            baseline = records[seed].get(BASELINE)
            if baseline is not None and lever != BASELINE:
                row["margins"][seed] = paired_bootstrap(*accuracy.aligned(records[seed][lever], baseline))
        rows.append(row)
    return {"ranks": ranks, "budget": first["budget"], "rows": rows}


def render_markdown(summary: dict[str, Any]) -> str:
    budget, ranks = summary["budget"], summary["ranks"]
    lines = [f"# Evaluation levers ({Path(budget['data']).name}, {budget['train_split']} -> {budget['test_split']})", "",
             f"Runs: herbarium defaults, {budget['trunk']}, {budget['size']} px, {budget['epochs']} epochs, batch "
             f"{budget['batch_size']}. Macro-F1 of the headline variant, mean ± sd over seeds; {ranks[0]} margin to "
             f"{BASELINE} per seed with its 95% paired bootstrap interval.", ""]
    header = ["lever", "what it changes", "seeds", *(f"{rank} macro-F1" for rank in ranks), f"{ranks[0]} - {BASELINE}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        margins = "; ".join(f"{m['delta']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]" for m in row["margins"].values())
        cells = [row["lever"], EVAL_LEVERS[row["lever"]][0], ",".join(map(str, row["seeds"])),
                 *(f"{row[r]['mean']:.3f}" + (f" ± {row[r]['std']:.3f}" if row[r]["std"] is not None else "")
                   for r in ranks), margins or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, records: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    summary = summarise(records)
    (out / "eval_levers.json").write_text(json.dumps(summary, indent=2))
    (out / "eval_levers.md").write_text(render_markdown(summary))
    return summary


# --------------------------------------------------------------------- cli
def _levers(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in EVAL_LEVERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown lever(s) {unknown or value!r}; choose from {', '.join(EVAL_LEVERS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("ablation", type=Path, help="output folder of bench/ablation.py with trained defaults runs")
    parser.add_argument("--levers", type=_levers, default=list(EVAL_LEVERS), help="levers to score")
    return parser


def load_records(out: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """{seed: {lever: result record}} of every lever already scored under ``out``."""
    records: dict[int, dict[str, dict[str, Any]]] = {}
    for path in sorted(out.glob("s*/eval_levers/*/result.json")):
        if path.parent.name in EVAL_LEVERS:
            records.setdefault(int(path.parents[2].name[1:]), {})[path.parent.name] = json.loads(path.read_text())
    return records


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levers = [BASELINE, *(name for name in args.levers if name != BASELINE)]
    for seed, (run, budget) in trained_runs(args.ablation).items():
        for lever in levers:
            score_lever(run, budget, lever, args.ablation / f"s{seed}" / "eval_levers" / lever)
            write_summary(args.ablation, load_records(args.ablation))
    print("\n" + (args.ablation / "eval_levers.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
