"""Metrics for one rank and for every rank of a taxonomy.

Macro-F1 is scikit-learn's ``f1_score(y_true, y_pred, average="macro")``, as
the Kaggle Herbarium competitions score it: the mean over every class that
appears in the answers *or* the predictions, so predicting a class absent
from the answers adds a zero. Long-tail behaviour is read from the
many/medium/few-shot groups (by training images of the true class) and from
per-class F1 next to each class's training count.

Every function returns plain Python numbers, lists and dicts (``None`` where
a figure has no images behind it), so results go to JSON as they are.
"""

from __future__ import annotations

import math

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score, precision_recall_fscore_support

from herbarium.taxonomy import Taxonomy

SHOT_GROUPS: tuple[str, ...] = ("many", "medium", "few")
DEFAULT_SHOT_THRESHOLDS: tuple[int, int] = (20, 100)
ArrayLike = Any  # a list, numpy array or torch tensor


def as_numpy(values: ArrayLike) -> np.ndarray:
    """A numpy array from a list, array or (any-device) tensor."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _fraction(numerator: int | float, denominator: int) -> float | None:
    return float(numerator) / denominator if denominator else None


def _name(class_names: Sequence[str] | None, index: int) -> str:
    return str(class_names[index]) if class_names is not None else str(index)


# ----------------------------------------------------------------- accuracy
def top_k_accuracy(y_true: ArrayLike, scores: ArrayLike, k: int) -> float | None:
    """Share of images whose true class is among the ``k`` best scores (k clipped to the class count).

    Args:
        y_true: [N] class indices.
        scores: [N, C] float scores, higher is better; or [N, K] integer
            class indices already ranked best first (what a streaming
            evaluation keeps instead of every score at 65k classes).
    """
    labels = torch.as_tensor(as_numpy(y_true), dtype=torch.long)
    scores = torch.as_tensor(as_numpy(scores))
    if scores.dim() != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be [{labels.shape[0]}, classes], got {tuple(scores.shape)}")
    if labels.numel() == 0:
        return None
    if not torch.is_floating_point(scores):
        top = scores[:, :k]
    else:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [N, k]
    return float((top == labels.unsqueeze(1)).any(dim=1).float().mean())


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike) -> float | None:
    """Kaggle's macro-F1: scikit-learn's, over classes in the answers or predictions."""
    y_true, y_pred = as_numpy(y_true), as_numpy(y_pred)
    if y_true.size == 0:
        return None
    # zero_division=0 gives the same numbers as the default "warn", without the warnings.
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


BOOTSTRAP_RESAMPLES = 1000


def paired_bootstrap(y_true: ArrayLike, ours: ArrayLike, theirs: ArrayLike, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> dict[str, float]:
    """Macro-F1 of ``ours`` minus ``theirs`` on the same images, with a 95% paired bootstrap interval.

    Each resample draws images with replacement and scores both prediction
    sets on the same draw, so the interval says how much the difference
    depends on which images the split happens to hold. Returns ``delta``,
    ``low``, ``high`` and ``resamples``.
    """
    (truth, mine, other), classes = _coded(y_true, ours, theirs)
    deltas = np.array([_coded_macro_f1(truth[d], mine[d], classes) - _coded_macro_f1(truth[d], other[d], classes)
                       for d in _draws(len(truth), resamples, seed)])
    low, high = np.percentile(deltas, [2.5, 97.5])
    delta = _coded_macro_f1(truth, mine, classes) - _coded_macro_f1(truth, other, classes)
    return {"delta": float(delta), "low": float(low), "high": float(high), "resamples": resamples}


def macro_f1_interval(y_true: ArrayLike, y_pred: ArrayLike, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> dict[str, float]:
    """Macro-F1 with a 95% bootstrap interval over the images: how much it depends on which images the split holds.

    Returns ``macro_f1``, ``low``, ``high``, ``images`` and ``resamples``.
    """
    (truth, predicted), classes = _coded(y_true, y_pred)
    scores = np.array([_coded_macro_f1(truth[d], predicted[d], classes) for d in _draws(len(truth), resamples, seed)])
    low, high = np.percentile(scores, [2.5, 97.5])
    return {"macro_f1": _coded_macro_f1(truth, predicted, classes), "low": float(low), "high": float(high),
            "images": len(truth), "resamples": resamples}


def _coded(*labels: ArrayLike) -> tuple[list[np.ndarray], int]:
    """Label arrays of the same images coded 0..classes-1 together, and the number of classes."""
    arrays = [as_numpy(values) for values in labels]
    if arrays[0].size == 0:
        raise ValueError("a bootstrap needs at least one image")
    _, codes = np.unique(np.concatenate(arrays), return_inverse=True)
    count = len(arrays[0])
    return [codes[i * count:(i + 1) * count] for i in range(len(arrays))], int(codes.max()) + 1


def _draws(count: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """``resamples`` draws of ``count`` image indices with replacement, one at a time (memory O(images))."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, count, count)


def _coded_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> float:
    """:func:`macro_f1` of labels coded 0..classes-1: 2TP / (true + predicted) averaged over the classes present."""
    true_counts = np.bincount(y_true, minlength=classes)
    predicted_counts = np.bincount(y_pred, minlength=classes)
    hits = np.bincount(y_true[y_true == y_pred], minlength=classes)
    present = (true_counts + predicted_counts) > 0
    return float((2 * hits[present] / (true_counts[present] + predicted_counts[present])).mean())


# --------------------------------------------------------------- long tail
def suggest_shot_thresholds(train_counts: ArrayLike) -> tuple[int, int]:
    """Training-count thresholds ``(low, high)``: few < low <= medium <= high < many.

    The usual definition (few < 20 <= medium <= 100 < many) is kept whenever
    it leaves no group empty. On a small or short-tailed set it would (no
    class over 100 images, or none under 20), so the groups become thirds of
    the classes sorted by count: ``low`` is one more than the count of the
    class a third of the way up, so the few-shot group always holds the
    rarest third of the classes (and every class tied with them);
    ``high`` is the count two thirds of the way up (at least ``low``).
    """
    counts = as_numpy(train_counts).astype(np.int64)
    positive = np.sort(counts[counts > 0])
    low, high = DEFAULT_SHOT_THRESHOLDS
    if positive.size == 0:
        return low, high
    if (positive < low).any() and ((positive >= low) & (positive <= high)).any() and (positive > high).any():
        return low, high
    third = int(positive[math.ceil(positive.size / 3) - 1])
    two_thirds = int(positive[math.ceil(2 * positive.size / 3) - 1])
    low = third + 1
    return low, max(low, two_thirds)


def shot_group_of(train_counts: np.ndarray, thresholds: tuple[int, int]) -> np.ndarray:
    """Group name of each class: ``"many"`` if count > high, ``"few"`` if count < low, else ``"medium"``."""
    low, high = thresholds
    if low > high:
        raise ValueError(f"shot thresholds must be (low, high) with low <= high, got {thresholds}")
    return np.where(train_counts > high, "many", np.where(train_counts < low, "few", "medium"))


def shot_group_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    train_counts: np.ndarray,
    thresholds: tuple[int, int],
    class_f1: Mapping[int, float],
) -> dict[str, dict[str, Any]]:
    """Accuracy, image and class counts, and mean per-class F1 for each shot group."""
    group_of_class = shot_group_of(train_counts, thresholds)  # [C]
    group_of_image = group_of_class[y_true]  # [N]
    correct = y_true == y_pred
    groups = {}
    for group in SHOT_GROUPS:
        in_group = group_of_image == group
        classes = np.unique(y_true[in_group])
        groups[group] = {
            "accuracy": _fraction(int(correct[in_group].sum()), int(in_group.sum())),
            "images": int(in_group.sum()),
            "classes": int(classes.size),
            "mean_class_f1": float(np.mean([class_f1[int(c)] for c in classes])) if classes.size else None,
        }
    return groups


# ---------------------------------------------------------------- classes
def per_class_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    train_counts: np.ndarray | None,
    class_names: Sequence[str] | None,
) -> list[dict[str, Any]]:
    """Precision, recall, F1, support, predictions and training count of each class.

    Covers the classes in the answers or the predictions, the same set the
    macro-F1 averages over, sorted by class index.
    """
    labels = np.union1d(y_true, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    predicted = np.bincount(y_pred, minlength=int(labels.max()) + 1 if labels.size else 0)
    return [
        {
            "class": int(label),
            "name": _name(class_names, int(label)),
            "train_count": int(train_counts[label]) if train_counts is not None else None,
            "support": int(support[i]),
            "predicted": int(predicted[label]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
        }
        for i, label in enumerate(labels)
    ]


def _pair_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (true, predicted) pairs and how often each occurs."""
    codes, counts = np.unique(y_true.astype(np.int64) * num_classes + y_pred, return_counts=True)
    return codes // num_classes, codes % num_classes, counts


def confused_pairs(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int,
    top_n: int,
    class_names: Sequence[str] | None,
    ancestors: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The ``top_n`` most frequent (true, predicted) mistakes, most frequent first.

    With an ``ancestors`` table each pair also gets its hierarchical distance
    (see :func:`hierarchical_distances`).
    """
    wrong = y_true != y_pred
    true, pred, counts = _pair_counts(y_true[wrong], y_pred[wrong], num_classes)
    order = np.lexsort((pred, true, -counts))[:top_n]  # count desc, then class order
    distances = hierarchical_distances(true[order], pred[order], ancestors) if ancestors is not None else None
    return [
        {
            "true": int(true[i]),
            "true_name": _name(class_names, int(true[i])),
            "predicted": int(pred[i]),
            "predicted_name": _name(class_names, int(pred[i])),
            "count": int(counts[i]),
            "distance": int(distances[j]) if distances is not None else None,
        }
        for j, i in enumerate(order)
    ]


def confusion_subset(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int,
    max_classes: int,
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    """Confusion counts among the classes of the most frequent mistakes, for a readable heat-map.

    Classes are taken pair by pair from the most frequent (true, predicted)
    mistakes until ``max_classes`` are chosen, in that order, so each
    confused pair sits close to the diagonal.

    Returns ``{"classes": [k], "names": [k], "matrix": [k][k]}`` with
    ``matrix[i][j]`` = images of ``classes[i]`` predicted as ``classes[j]``
    (the diagonal holds the correct ones).
    """
    wrong = y_true != y_pred
    true, pred, counts = _pair_counts(y_true[wrong], y_pred[wrong], num_classes)
    chosen: list[int] = []
    for i in np.lexsort((pred, true, -counts)):  # most frequent mistakes first
        for label in (int(true[i]), int(pred[i])):
            if label not in chosen and len(chosen) < max_classes:
                chosen.append(label)
        if len(chosen) >= max_classes:
            break
    classes = np.array(chosen, dtype=np.int64)
    position = {c: i for i, c in enumerate(chosen)}
    matrix = [[0] * len(classes) for _ in classes]
    keep = np.isin(y_true, classes) & np.isin(y_pred, classes)
    for t, p, n in zip(*_pair_counts(y_true[keep], y_pred[keep], num_classes)):
        matrix[position[int(t)]][position[int(p)]] = int(n)
    return {"classes": chosen, "names": [_name(class_names, c) for c in chosen], "matrix": matrix}


# ---------------------------------------------------------------- hierarchy
def ancestor_table(taxonomy: Taxonomy, rank: str) -> tuple[np.ndarray, list[str]]:
    """Each class's ancestors, nearest first: (int array [C, K], the K ancestor rank names).

    For species in family > genus > species: columns (genus, family).
    """
    above = list(reversed(taxonomy.ranks[: taxonomy.rank_index(rank)]))
    columns = [taxonomy.ancestor_map(rank, ancestor).numpy() for ancestor in above]
    table = np.stack(columns, axis=1) if columns else np.zeros((taxonomy.num_classes(rank), 0), dtype=np.int64)
    return table, above


def hierarchical_distances(y_true: np.ndarray, y_pred: np.ndarray, ancestors: np.ndarray) -> np.ndarray:
    """Ranks up to the first shared ancestor of each (true, predicted) pair: int array [M].

    1 = same parent, 2 = same grandparent, ..., K + 1 = no shared ancestor
    (K = number of ranks above; at the coarsest rank every mistake is 1).
    """
    levels = ancestors.shape[1]
    if levels == 0:
        return np.ones(len(y_true), dtype=np.int64)
    shared = ancestors[y_true] == ancestors[y_pred]  # [M, K]; once shared, shared above too
    return np.where(shared.any(axis=1), shared.argmax(axis=1) + 1, levels + 1)


def hierarchical_distance_summary(
    y_true: np.ndarray, y_pred: np.ndarray, ancestors: np.ndarray, ancestor_ranks: Sequence[str]
) -> dict[str, Any]:
    """Mean and histogram of the hierarchical distance of the mistakes.

    ``levels`` names what each distance means (``{"1": "genus", "2":
    "family", "3": "none"}`` at species), keys are strings for JSON.
    """
    wrong = y_true != y_pred
    distances = hierarchical_distances(y_true[wrong], y_pred[wrong], ancestors)
    level_names = list(ancestor_ranks) + ["none"]
    return {
        "mistakes": int(wrong.sum()),
        "mean": float(distances.mean()) if distances.size else None,
        "histogram": {str(d): int((distances == d).sum()) for d in range(1, len(level_names) + 1)},
        "levels": {str(d): name for d, name in enumerate(level_names, start=1)},
    }


# --------------------------------------------------------------- one rank
def rank_metrics(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    scores: ArrayLike | None = None,
    train_counts: ArrayLike | None = None,
    thresholds: tuple[int, int] = DEFAULT_SHOT_THRESHOLDS,
    *,
    class_names: Sequence[str] | None = None,
    ancestors: np.ndarray | None = None,
    ancestor_ranks: Sequence[str] | None = None,
    top_confused: int = 20,
    confusion_classes: int = 15,
) -> dict[str, Any]:
    """All metrics of one rank.

    Args:
        y_true, y_pred: [N] class indices.
        scores: [N, C] scores for top-k (any monotone scale); None skips top-5.
        train_counts: [C] training images per class; None skips shot groups.
        thresholds: (low, high) shot thresholds, see :func:`shot_group_of`.
        class_names: [C] names for the tables; indices when None.
        ancestors, ancestor_ranks: from :func:`ancestor_table`; None skips
            hierarchical distances.
        top_confused: number of confused pairs kept.
        confusion_classes: classes in the confusion heat-map subset.

    Returns:
        ``images, num_classes, top1, top5, top5_k, macro_f1, shot_thresholds,
        shot_groups, per_class, confused_pairs, confusion,
        hierarchical_distance`` (see the report for how each is shown).
    """
    y_true = as_numpy(y_true).astype(np.int64).ravel()
    y_pred = as_numpy(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    counts = as_numpy(train_counts).astype(np.int64) if train_counts is not None else None
    num_classes = _num_classes(y_true, y_pred, scores, counts, class_names)
    per_class = per_class_metrics(y_true, y_pred, counts, class_names)
    class_f1 = {record["class"]: record["f1"] for record in per_class}
    has_scores = scores is not None
    return {
        "images": int(y_true.size),
        "num_classes": num_classes,
        "top1": _fraction(int((y_true == y_pred).sum()), y_true.size),
        "top5": top_k_accuracy(y_true, scores, 5) if has_scores else None,
        "top5_k": min(5, num_classes, int(as_numpy(scores).shape[1])) if has_scores else None,
        "macro_f1": macro_f1(y_true, y_pred),
        "shot_thresholds": list(thresholds) if counts is not None else None,
        "shot_groups": shot_group_metrics(y_true, y_pred, counts, thresholds, class_f1) if counts is not None else None,
        "per_class": per_class,
        "confused_pairs": confused_pairs(y_true, y_pred, num_classes, top_confused, class_names, ancestors),
        "confusion": confusion_subset(y_true, y_pred, num_classes, confusion_classes, class_names),
        "hierarchical_distance": (
            hierarchical_distance_summary(y_true, y_pred, ancestors, ancestor_ranks or [])
            if ancestors is not None
            else None
        ),
    }


def _num_classes(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: ArrayLike | None,
    train_counts: np.ndarray | None,
    class_names: Sequence[str] | None,
) -> int:
    """The class count all inputs agree on; fails on labels out of range."""
    sizes = {len(x) for x in (train_counts, class_names) if x is not None}
    if scores is not None and np.issubdtype(as_numpy(scores).dtype, np.floating):
        sizes.add(int(scores.shape[1]) if hasattr(scores, "shape") else len(scores[0]))
    if len(sizes) > 1:
        raise ValueError(f"scores, train_counts and class_names disagree on the class count: {sorted(sizes)}")
    largest = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    num_classes = sizes.pop() if sizes else largest
    if largest > num_classes or min(y_true.min(initial=0), y_pred.min(initial=0)) < 0:
        raise ValueError(f"class indices must lie in [0, {num_classes}); got up to {largest - 1}")
    return num_classes


# -------------------------------------------------------------- all ranks
def evaluate_predictions(
    y_true_by_rank: Mapping[str, ArrayLike],
    pred_by_rank: Mapping[str, ArrayLike],
    scores_by_rank: Mapping[str, ArrayLike] | None,
    taxonomy: Taxonomy,
    train_counts_by_rank: Mapping[str, ArrayLike] | None = None,
    thresholds: tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
    top_confused: int = 20,
) -> dict[str, dict[str, Any]]:
    """:func:`rank_metrics` for every rank with both labels and predictions, coarse to fine.

    Args:
        thresholds: one (low, high) pair for all ranks, one per rank, or
            None to take :func:`suggest_shot_thresholds` of each rank's counts.
    """
    ranks = [rank for rank in taxonomy.ranks if rank in y_true_by_rank and rank in pred_by_rank]
    results = {}
    for rank in ranks:
        counts = (train_counts_by_rank or {}).get(rank)
        ancestors, ancestor_ranks = ancestor_table(taxonomy, rank)
        results[rank] = rank_metrics(
            y_true_by_rank[rank],
            pred_by_rank[rank],
            (scores_by_rank or {}).get(rank),
            counts,
            _rank_thresholds(thresholds, rank, counts),
            class_names=taxonomy.names[rank],
            ancestors=ancestors,
            ancestor_ranks=ancestor_ranks,
            top_confused=top_confused,
        )
    return results


def _rank_thresholds(
    thresholds: tuple[int, int] | Mapping[str, tuple[int, int]] | None, rank: str, counts: ArrayLike | None
) -> tuple[int, int]:
    if isinstance(thresholds, Mapping):
        thresholds = thresholds.get(rank)
    if thresholds is not None:
        return int(thresholds[0]), int(thresholds[1])
    return suggest_shot_thresholds(counts) if counts is not None else DEFAULT_SHOT_THRESHOLDS
