"""The ``evaluate`` command line (``tta_eval.py``, ``herbarium evaluate``)."""

from __future__ import annotations

import argparse
from typing import Sequence

from herbarium.evaluation.runner import EvaluationSettings, evaluate
from herbarium.train_cli import _weights

S = EvaluationSettings()


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(part) for part in value.split(","))


def _pair(value: str) -> tuple[int, int]:
    low, high = (int(part) for part in value.split(","))
    return low, high


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta_eval.py", description="Test-time-augmentation evaluation of runs or checkpoints, "
                                     "with hierarchy-aware decoding, a report and a submission file.")
    parser.add_argument("runs", nargs="+", help="run directories (best.pt, else last.pt) or checkpoint files; several make an ensemble")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset folder")
    data.add_argument("--split", default="test", help="split to evaluate (default: test)")
    data.add_argument("--labels", default=None, help="image_id,category_id CSV for a split whose metadata has no labels (default: the split's labels.csv if present)")
    data.add_argument("--batch-size", type=int, default=S.batch_size, help=f"images per batch; each brings all its views (default: {S.batch_size})")
    data.add_argument("--workers", type=int, default=S.workers, help="decoding processes (default: all cores)")
    data.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images (default: off)")
    tta = parser.add_argument_group("test-time augmentation and ensembling")
    tta.add_argument("--views", default=",".join(S.views), help="a number N (N-1 'train' views + 'plain') or a list of views: plain, flip, train (default: train,train,train,plain)")
    tta.add_argument("--average", choices=("logits", "probs"), default=S.average, help=f"average logits or probabilities over views and models (default: {S.average})")
    tta.add_argument("--model-weights", type=_floats, default=S.model_weights, help="one weight per model of an ensemble (default: equal)")
    tta.add_argument("--rank-weights", type=_weights, default=S.rank_weights, help="weights of each rank's log-probability in consistent decoding, e.g. species=1,genus=0.5 (default: 1 each)")
    tta.add_argument("--primary", default=S.primary, choices=("tta_consistent", "tta_heads", "single_view_heads", "single_view_consistent"), help=f"the variant headlined and written to the submission (default: {S.primary})")
    tta.add_argument("--seed", type=int, default=S.seed, help=f"seed of the random views (default: {S.seed})")
    out = parser.add_argument_group("output and device")
    out.add_argument("--out", default=None, help="output folder (default: RUN/eval/SPLIT)")
    out.add_argument("--shot-thresholds", type=_pair, default=S.shot_thresholds, help="few/many-shot training counts LOW,HIGH (default: 20,100, scaled down for small training sets)")
    out.add_argument("--device", default=S.device, help=f"cpu, cuda or auto (default: {S.device})")
    out.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=S.precision, help="autocast precision (default: auto: bf16 on CUDA)")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    from herbarium.evaluation.tta import parse_views

    return EvaluationSettings(
        views=parse_views(args.views), average=args.average, model_weights=args.model_weights, rank_weights=args.rank_weights,
        batch_size=args.batch_size, workers=args.workers, seed=args.seed, device=args.device, precision=args.precision,
        shot_thresholds=args.shot_thresholds, primary=args.primary, skip_bad_images=args.skip_bad_images,
    )


def summary(result: dict) -> str:
    metrics = result["metrics"]
    lines = []
    throughput = metrics["throughput"]
    lines.append(f"{throughput['images_per_s']:.1f} images/s ({throughput['views']} views, {throughput['models']} model(s)) on {throughput['hardware']}")
    if "variants" in metrics:
        for variant, ranks in metrics["variants"].items():
            scores = "  ".join(f"{rank} F1 {m['macro_f1']:.3f} top1 {m['top1']:.3f}" for rank, m in ranks.items())
            lines.append(f"{variant:>24}: {scores}")
    lines.append(f"report: {result['paths']['html']}")
    lines.append(f"submission: {result['out_dir'] / 'submission.csv'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = evaluate(args.runs, args.data, args.split, args.labels, args.out, settings_from_args(args))
    print(summary(result))
    return 0
