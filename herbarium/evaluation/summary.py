"""What ``tta_eval.py`` prints at its start and end, as ``train.py`` does: the evaluation at a glance, then the
scores, the files and which variant went to ``submission.csv``.

Pure functions of plain values, so the runner and the command only print them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from herbarium.evaluation.posthoc import AUTO, TAU_GRID
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.options import format_default


def startup_lines(model_lines: Sequence[str], checkpoints: Sequence[str], data: str | Path, split: str, images: int,
                  labelled: bool, settings: EvaluationSettings, hardware: str, decode: str, batch_size: int,
                  out_dir: Path) -> list[str]:
    """The evaluation at a glance, before the first batch."""
    models = "model" if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)} models"
    lines = [f"evaluate: {models}"]
    lines += [f"  {checkpoint}: {line}" for checkpoint, line in zip(checkpoints, model_lines)]
    lines.append(f"  data: {data}, split {split!r}, {images:,} images, "
                 f"{'labelled: metrics and report' if labelled else 'no labels: predictions only'}")
    lines.append(f"  views: {len(settings.views)} ({','.join(settings.views)}), {settings.average} averaged; "
                 f"batch {batch_size} images, input path {decode}, {hardware}")
    headline = (f"--primary {settings.primary}" if settings.primary else
                "tta_consistent unless the run's validation split clearly prefers another variant")
    lines.append(f"  submission.csv: {headline}")
    if settings.posthoc_tau == AUTO:
        lines.append(f"  post-hoc logit adjustment: tau chosen on the run's validation split from {format_default(TAU_GRID)}")
    elif settings.posthoc_tau:
        lines.append(f"  post-hoc logit adjustment: logits - {settings.posthoc_tau:g} * log(training class frequency)")
    lines.append(f"  out: {out_dir}")
    return lines


def end_lines(result: dict[str, Any]) -> list[str]:
    """Speed, scores per variant (the headline one marked), the files, the headline variant and why."""
    metrics = result["metrics"]
    throughput = metrics["throughput"]
    lines = [f"{throughput['images_per_s']:.1f} images/s ({throughput['views']} views, {throughput['models']} model(s)) "
             f"on {throughput['hardware']}"]
    primary = metrics["primary_choice"]["variant"]
    for variant, ranks in metrics.get("variants", {}).items():
        scores = "  ".join(f"{rank} F1 {m['macro_f1']:.3f} top1 {m['top1']:.3f}" for rank, m in ranks.items())
        lines.append(f"{'* ' if variant == primary else '  '}{variant:>22}: {scores}")
    lines.append(f"report: {result['paths']['html']}")
    lines.append(f"submission: {result['out_dir'] / 'submission.csv'} (variant {primary}: "
                 f"{metrics['primary_choice']['reason']})")
    if "posthoc_tau" in metrics:
        lines.append(f"post-hoc logit adjustment: tau {metrics['posthoc_tau']['tau']:g} ({metrics['posthoc_tau']['reason']})")
    if metrics.get("skipped_bad_images"):
        fallback = metrics.get("fallback", {})
        lines.append(f"skipped {metrics['skipped_bad_images']} unreadable images (--skip-bad-images); they are in "
                     f"submission.csv with the most frequent training class ({fallback.get('category_id')}), marked "
                     "in the fallback column of predictions.csv, and left out of the metrics")
    return lines
