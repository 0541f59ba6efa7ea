"""The ``evaluate`` command line (``tta_eval.py``, ``herbarium evaluate``)."""

from __future__ import annotations

import argparse
from typing import Sequence

from herbarium.data.gpu import AUTO_DEVICE_BELOW_CORES, DECODES
from herbarium.errors import command
from herbarium.evaluation.runner import EvaluationSettings, evaluate
from herbarium.evaluation.tta import VIEW_VOCABULARY, parse_views
from herbarium.options import comma_separated, rank_weights

S = EvaluationSettings()


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(part) for part in value.split(","))


def _pair(value: str) -> tuple[int, int]:
    low, high = (int(part) for part in value.split(","))
    return low, high


def build_parser() -> argparse.ArgumentParser:
    from herbarium.cli import prog

    parser = argparse.ArgumentParser(prog=prog("tta_eval.py"), description="Test-time-augmentation evaluation of runs or checkpoints, "
                                     "with hierarchy-aware decoding, a report and a submission file.")
    parser.add_argument("runs", nargs="+", help="run directories (best.pt, else last.pt) or checkpoint files; several make an ensemble")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="dataset folder")
    data.add_argument("--split", default="test", help="split to evaluate (default: test)")
    data.add_argument("--labels", default=None, help="image_id,category_id CSV for a split whose metadata has no labels (default: the split's labels.csv if present)")
    data.add_argument("--batch-size", type=int, default=S.batch_size, help="images per batch; each brings all its views (default: 128 on a CUDA device, 32 otherwise)")
    data.add_argument("--workers", type=int, default=S.workers, help="decoding processes (default: all cores)")
    data.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images (default: off)")
    data.add_argument("--decode", choices=DECODES, default=S.decode, help=f"where JPEGs are decoded and cut into views: cpu (PIL in the workers), gpu (nvJPEG on the device, all views of a batch in one batched call) or auto: gpu only on a CUDA device that decodes JPEGs with fewer than {AUTO_DEVICE_BELOW_CORES} cores per GPU, else cpu (measured faster with 16 cores; see README) (default: auto)")
    tta = parser.add_argument_group("test-time augmentation and ensembling")
    tta.add_argument("--views", default=",".join(S.views), help=f"comma-separated views: {VIEW_VOCABULARY} (default: {','.join(S.views)})")
    tta.add_argument("--average", choices=("logits", "probs"), default=S.average, help=f"average logits or probabilities over views and models (default: {S.average})")
    tta.add_argument("--model-weights", type=_floats, default=S.model_weights, help="one weight per model of an ensemble (default: equal)")
    tta.add_argument("--rank-weights", type=rank_weights, default=S.rank_weights, help="weights of each rank's log-probability in consistent decoding, e.g. species=1,genus=0.5 (default: 1 each)")
    tta.add_argument("--primary", default=S.primary, choices=("tta_consistent", "tta_heads", "single_view_heads", "single_view_consistent", "retrieval_heads", "retrieval_consistent"),
                     help="the variant headlined and written to the submission (default: the best species macro-F1 on the run's own validation split; tta_consistent for a run without one)")
    tta.add_argument("--class-weighted-ensemble", dest="class_weighted", action="store_true", default=S.class_weighted,
                     help="weight each model per class by its validation accuracy on that class (AliProducts) instead of one weight per model (default: off)")
    tta.add_argument("--weights-split", default=S.weights_split, help=f"split the class weights are measured on: 'val' = each run's own validation split, or a split of --data (default: {S.weights_split})")
    tta.add_argument("--class-weight-power", type=float, default=S.class_weight_power, help=f"per-class accuracy is raised to this power before normalising across models (default: {S.class_weight_power:g})")
    retrieval = parser.add_argument_group("retrieval (classify by cosine similarity to a labelled gallery)")
    retrieval.add_argument("--retrieval-gallery", default=S.retrieval_gallery, help="labelled split of --data embedded as the gallery, e.g. train (default: off)")
    retrieval.add_argument("--retrieval-mode", choices=("centroid", "knn"), default=S.retrieval_mode, help=f"nearest class centroid, or vote of the k nearest gallery images (default: {S.retrieval_mode})")
    retrieval.add_argument("--retrieval-k", type=int, default=S.retrieval_k, help=f"neighbours of the knn vote (default: {S.retrieval_k})")
    retrieval.add_argument("--retrieval-weight", type=float, default=S.retrieval_weight, help=f"share of retrieval in its mix with the heads' log-probs, 1 = retrieval alone (default: {S.retrieval_weight:g})")
    retrieval.add_argument("--retrieval-levels", type=comma_separated(), default=S.retrieval_levels, help="ranks scored by retrieval, e.g. species,genus (default: the finest rank only)")
    retrieval.add_argument("--retrieval-scale", type=float, default=S.retrieval_scale, help=f"similarities become log_softmax(scale * cosine) (default: {S.retrieval_scale:g})")
    tta.add_argument("--seed", type=int, default=S.seed, help=f"seed of the random views (default: {S.seed})")
    out = parser.add_argument_group("output and device")
    out.add_argument("--out", default=None, help="output folder (default: RUN/eval/SPLIT)")
    out.add_argument("--shot-thresholds", type=_pair, default=S.shot_thresholds, help="shot groups by training count: few < LOW <= medium <= HIGH < many (default: 20,100; where a group would be empty, thirds of the classes by count, the rarest third few-shot)")
    out.add_argument("--device", default=S.device, help=f"cpu, cuda or auto (default: {S.device})")
    out.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=S.precision, help="autocast precision (default: auto: bf16 on CUDA)")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    return EvaluationSettings(
        views=parse_views(args.views), average=args.average, model_weights=args.model_weights, rank_weights=args.rank_weights,
        batch_size=args.batch_size, workers=args.workers, seed=args.seed, device=args.device, precision=args.precision,
        shot_thresholds=args.shot_thresholds, primary=args.primary, skip_bad_images=args.skip_bad_images, decode=args.decode,
        retrieval_gallery=args.retrieval_gallery, retrieval_mode=args.retrieval_mode, retrieval_k=args.retrieval_k,
        retrieval_weight=args.retrieval_weight, retrieval_scale=args.retrieval_scale, retrieval_levels=args.retrieval_levels,
        class_weighted=args.class_weighted,
        weights_split=args.weights_split, class_weight_power=args.class_weight_power,
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
    if metrics.get("skipped_bad_images"):
        fallback = metrics.get("fallback", {})
        lines.append(f"skipped {metrics['skipped_bad_images']} unreadable images (--skip-bad-images); they are in submission.csv "
                     f"with the most frequent training class ({fallback.get('category_id')}), marked in the fallback column "
                     "of predictions.csv, and left out of the metrics")
    return "\n".join(lines)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    result = evaluate(args.runs, args.data, args.split, args.labels, args.out, settings)
    print(summary(result))
    return 0
