"""What an evaluation does: the settings of ``tta_eval.py`` / ``herbarium evaluate``.

Each setting is one field declared with :func:`herbarium.options.option`,
with its default and help; the command line's options are generated from
them (see :mod:`herbarium.evaluation.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herbarium.data.gpu import AUTO_DEVICE_BELOW_CORES, DECODES
from herbarium.evaluation.combine import AVERAGING_MODES
from herbarium.evaluation.decoding import VARIANTS
from herbarium.evaluation.metrics import DEFAULT_SHOT_THRESHOLDS
from herbarium.evaluation.posthoc import AUTO, TAU_GRID, parse_tau
from herbarium.evaluation.tta import DEFAULT_VIEWS, VIEW_VOCABULARY, parse_views
from herbarium.options import format_default, option
from herbarium.retrieval import RETRIEVAL_MODES
from herbarium.runtime import PRECISIONS

# The headline variant unless validation clearly prefers another (evaluation.runner.choose_tau_and_primary): TTA with consistent decoding
# had the best species macro-F1 on grocery-store val with both the old and the new training defaults (BENCHMARKS.md).
FALLBACK_PRIMARY = "tta_consistent"

# Default images per evaluation batch. A batch brings all its views: 32 images of 4 views were a model
# batch of 128, which leaves a GPU idle between batches; 128 images make it 512, the batch at which
# bench/throughput.py measures the inference ceiling.
EVAL_BATCH = {"cuda": 128, "cpu": 32}


@dataclass
class EvaluationSettings:
    views: tuple[str, ...] = option(DEFAULT_VIEWS, f"comma-separated views: {VIEW_VOCABULARY}", parse=parse_views)
    average: str = option("logits", "average logits or probabilities over views and models", choices=AVERAGING_MODES)
    model_weights: tuple[float, ...] | None = option(None, "one weight per model of an ensemble", default_text="equal")
    rank_weights: dict[str, float] = option(
        help="weights of each rank's log-probability in consistent decoding, e.g. species=1,genus=0.5",
        default_factory=dict, default_text="1 each")
    batch_size: int | None = option(
        None, "images per batch; each brings all its views",
        default_text=f"{EVAL_BATCH['cuda']} on a CUDA device, {EVAL_BATCH['cpu']} otherwise")
    workers: int | None = option(None, "decoding processes", default_text="all cores")
    seed: int = option(0, "seed of the random views")
    device: str = option("auto", "cpu, cuda or auto")
    precision: str = option("auto", "autocast precision", choices=PRECISIONS, default_text="auto: bf16 on CUDA")
    shot_thresholds: tuple[int, int] | None = option(
        None, "shot groups by training count: few < LOW <= medium <= HIGH < many", metavar="LOW,HIGH",
        default_text=f"{format_default(DEFAULT_SHOT_THRESHOLDS)}; where a group would be empty, thirds of the classes "
                     "by count, the rarest third few-shot")
    primary: str | None = option(
        None, "the variant headlined and written to the submission", choices=VARIANTS,
        default_text=f"{FALLBACK_PRIMARY}, unless another variant beats it on the run's own validation split with its "
                     "whole 95% bootstrap interval of species macro-F1 above zero")
    posthoc_tau: float | str = option(
        0.0, "post-hoc logit adjustment: subtract TAU * log(training class frequency) from each rank's logits before "
             f"views are averaged; '{AUTO}': the tau of {format_default(TAU_GRID)} with the best finest-rank macro-F1 "
             "of the headline variant on the run's validation split (0 without one)",
        parse=parse_tau, metavar="TAU", default_text="0, off")
    skip_bad_images: bool = option(False, "skip and count unreadable images")
    decode: str = option(
        "auto", "where JPEGs are decoded and cut into views: cpu (PIL in the workers), gpu (nvJPEG on the device, all "
                "views of a batch in one batched call) or auto: gpu only on a CUDA device that decodes JPEGs with fewer "
                f"than {AUTO_DEVICE_BELOW_CORES} cores per GPU, else cpu (measured faster with 16 cores; see README)",
        choices=DECODES)
    retrieval_gallery: str | None = option(None, "labelled split of --data embedded as the gallery, e.g. train",
                                           default_text="off")
    retrieval_mode: str = option("centroid", "nearest class centroid, or vote of the k nearest gallery images",
                                 choices=RETRIEVAL_MODES)
    retrieval_k: int = option(5, "neighbours of the knn vote")
    retrieval_weight: float = option(0.5, "share of retrieval in its mix with the heads' log-probs, 1 = retrieval alone")
    retrieval_scale: float = option(30.0, "similarities become log_softmax(scale * cosine)")
    retrieval_levels: tuple[str, ...] | None = option(None, "ranks scored by retrieval, e.g. species,genus",
                                                      default_text="the finest rank with a head")
    class_weighted: bool = option(
        False, "weight each model per class by its validation accuracy on that class (AliProducts) instead of one "
               "weight per model", flag="--class-weighted-ensemble")
    weights_split: str = option("val", "split the class weights are measured on: 'val' = each run's own validation "
                                       "split, or a split of --data")
    quiet: bool = option(False, "no progress bars, for logs: the start-up and end summaries stay (bars are also off "
                                "when stderr is not a terminal)")
    class_weight_power: float = option(2.0, "per-class accuracy is raised to this power before normalising across models")

    def __post_init__(self) -> None:
        if self.retrieval_mode not in RETRIEVAL_MODES:
            raise ValueError(f"unknown retrieval mode {self.retrieval_mode!r}; choose one of {list(RETRIEVAL_MODES)}")
        if self.retrieval_k < 1:
            raise ValueError(f"retrieval k must be >= 1, got {self.retrieval_k}")
        if not 0.0 <= self.retrieval_weight <= 1.0:
            raise ValueError(f"retrieval weight must be in [0, 1], got {self.retrieval_weight}")
        if self.decode not in DECODES:
            raise ValueError(f"unknown decode {self.decode!r}; choose one of {list(DECODES)}")
        try:
            self.posthoc_tau = parse_tau(str(self.posthoc_tau))  # "auto" or a float, however it was given
        except ValueError as error:
            raise ValueError(f"posthoc tau: {error}") from None
        if self.class_weighted and self.model_weights is not None:
            raise ValueError("class-weighted ensembles set each model's weight per class; drop the model weights")

    def batch_for(self, device: torch.device) -> int:
        """Images per batch on ``device``: ``batch_size``, else :data:`EVAL_BATCH` of its type."""
        return self.batch_size or EVAL_BATCH.get(device.type, EVAL_BATCH["cpu"])
