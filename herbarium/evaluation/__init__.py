"""Evaluation: view and model averaging, decoding, metrics, the report and submissions.

The path of the scores: per-view logits -> :func:`average_views` (and
:func:`ensemble` across models) -> log-probabilities per rank ->
:func:`independent_predictions` or consistent decoding along the taxonomy
-> :func:`evaluate_predictions` -> :func:`write_report`; for a test split,
:func:`write_submission` and :func:`write_predictions`.
"""

from herbarium.evaluation.combine import AVERAGING_MODES, average_views, class_weighted_ensemble, ensemble
from herbarium.evaluation.decoding import (
    PathDecoder,
    consistent_predictions,
    consistent_scores,
    inconsistent_mask,
    independent_predictions,
    taxonomy_disagreement,
)
from herbarium.evaluation.metrics import (
    DEFAULT_SHOT_THRESHOLDS,
    SHOT_GROUPS,
    ancestor_table,
    evaluate_predictions,
    macro_f1,
    rank_metrics,
    suggest_shot_thresholds,
    top_k_accuracy,
)
from herbarium.evaluation.report import to_jsonable, write_report
from herbarium.evaluation.submission import top_k_probabilities, write_atomic, write_predictions, write_submission

__all__ = [
    "AVERAGING_MODES",
    "DEFAULT_SHOT_THRESHOLDS",
    "PathDecoder",
    "SHOT_GROUPS",
    "ancestor_table",
    "average_views",
    "class_weighted_ensemble",
    "consistent_predictions",
    "consistent_scores",
    "ensemble",
    "evaluate_predictions",
    "inconsistent_mask",
    "independent_predictions",
    "macro_f1",
    "rank_metrics",
    "suggest_shot_thresholds",
    "taxonomy_disagreement",
    "to_jsonable",
    "top_k_accuracy",
    "write_atomic",
    "top_k_probabilities",
    "write_predictions",
    "write_report",
    "write_submission",
]
