"""Averaging scores over test-time-augmentation views and over models.

Both functions return *log-probabilities* whatever the averaging mode, so
that argmax, top-k, consistent decoding and a further level of averaging all
read their output the same way:

* ``"logits"``: the (weighted) mean of the logits, renormalised with
  ``log_softmax``; this is the normalised geometric mean of the views'
  probabilities. The Herbarium 2020 write-up found logit averaging better
  than probability averaging for both TTA and ensembles, so it is the default.
* ``"probs"``: the log of the (weighted) mean of the softmax probabilities,
  the arithmetic mean. Here a view adds at most its weight to any class, so
  one very confident view cannot outvote several views that mildly agree on
  another class, as it can with the logit mean (the tests show both cases).

Renormalising costs nothing in logit mode: ``log_softmax`` only subtracts a
per-row constant, so the mean of renormalised views equals the renormalised
mean of the raw logits. Averaging is done in float32 whatever the input
precision, because bf16 logits lose the small differences that decide top-1
among tens of thousands of classes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

AVERAGING_MODES: tuple[str, ...] = ("logits", "probs")


def check_mode(mode: str) -> str:
    """Return ``mode`` or fail with the valid choices."""
    if mode not in AVERAGING_MODES:
        raise ValueError(f"unknown averaging mode {mode!r}; choose one of {list(AVERAGING_MODES)}")
    return mode


def normalised_weights(weights: Tensor | Sequence[float] | None, count: int, device: torch.device | None = None) -> Tensor:
    """Non-negative weights summing to one: FloatTensor [count] on ``device``; uniform when ``weights`` is None.

    Given weights are checked where they are (the host, as a rule) and then
    copied without waiting: a blocking copy to a GPU would wait for all its
    queued work on every batch.
    """
    if weights is None:
        return torch.full((count,), 1.0 / count, device=device)
    weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if weights.numel() != count:
        raise ValueError(f"got {weights.numel()} weights for {count} score sets")
    if bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
    return (weights / weights.sum()).to(device or weights.device, non_blocking=True)


def average_views(view_logits: Tensor, mode: str = "logits", weights: Tensor | Sequence[float] | None = None) -> Tensor:
    """Average the scores of several views of the same images.

    Args:
        view_logits: FloatTensor [V, B, C], logits (or log-probabilities) of
            V views of B images over C classes.
        mode: ``"logits"`` (mean logit) or ``"probs"`` (mean probability).
        weights: optional per-view weights [V]; normalised to sum to one.

    Returns:
        FloatTensor [B, C] of log-probabilities (float32).
    """
    check_mode(mode)
    if view_logits.dim() != 3:
        raise ValueError(f"view_logits must be [views, batch, classes], got shape {tuple(view_logits.shape)}")
    num_views = view_logits.shape[0]
    if num_views == 0:
        raise ValueError("cannot average zero views")
    view_weights = normalised_weights(weights, num_views, view_logits.device)  # [V]
    view_logits = view_logits.float()
    if mode == "logits":
        # [V] @ [B, V, C]: a batched product that reads the views in place (einsum copied [V, B, C] first
        # when the views came as a transposed [B, V, C], as a model's output does)
        mean_logits = torch.matmul(view_weights, view_logits.transpose(0, 1))  # [B, C]
        return torch.log_softmax(mean_logits, dim=-1)
    # log(sum_v w_v * p_v) computed as a logsumexp so that tiny probabilities
    # of rare classes do not underflow to log(0).
    view_log_probs = torch.log_softmax(view_logits, dim=-1)  # [V, B, C]
    log_weights = torch.log(view_weights).view(num_views, 1, 1)  # -inf for a zero weight
    return torch.logsumexp(view_log_probs + log_weights, dim=0)  # [B, C]


def ensemble(
    score_dicts: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    mode: str = "logits",
) -> dict[str, Tensor]:
    """Average several models' per-rank scores.

    Args:
        score_dicts: one ``{rank: FloatTensor [B, C]}`` per model, logits or
            log-probabilities (e.g. the output of :func:`average_views`).
        weights: optional per-model weights; normalised per rank.
        mode: as in :func:`average_views`.

    Returns:
        ``{rank: FloatTensor [B, C]}`` log-probabilities. A rank that only
        some models predict is averaged over those models alone (their
        weights renormalised), so models with different sets of heads can
        still be combined; decoding treats the ranks no model has as absent.
    """
    check_mode(mode)
    if not score_dicts:
        raise ValueError("cannot ensemble zero models")
    model_weights = normalised_weights(weights, len(score_dicts))
    ranks = list(dict.fromkeys(rank for scores in score_dicts for rank in scores))
    combined: dict[str, Tensor] = {}
    for rank in ranks:
        members = [i for i, scores in enumerate(score_dicts) if rank in scores]
        shapes = {tuple(score_dicts[i][rank].shape) for i in members}
        if len(shapes) != 1:
            raise ValueError(f"models disagree on the {rank!r} score shape: {sorted(shapes)}")
        stacked = torch.stack([score_dicts[i][rank].float() for i in members])  # [M, B, C]
        rank_weights = model_weights[members]
        if not float(rank_weights.sum()) > 0:
            raise ValueError(f"every model predicting {rank!r} has weight zero")
        combined[rank] = average_views(stacked, mode, rank_weights)
    return combined


def class_weighted_ensemble(
    score_dicts: Sequence[Mapping[str, Tensor]],
    class_weights: Sequence[Mapping[str, Tensor]],
    mode: str = "logits",
) -> dict[str, Tensor]:
    """Average several models' per-rank scores with a weight per model *and class*.

    The AliProducts class-based ensemble: a model's weight for class c
    reflects how well it recognises c (see :func:`class_weights_from_accuracy`), so
    each model has the most say on the classes it is good at.

    Args:
        score_dicts: one ``{rank: FloatTensor [B, C]}`` per model (logits or
            log-probabilities).
        class_weights: one ``{rank: FloatTensor [C]}`` per model, non-negative;
            renormalised per class over the models predicting the rank (a class
            whose weights are all zero is averaged uniformly).
        mode: ``"logits"``: ``sum_m w_mc * log p_m(c)``; ``"probs"``:
            ``log sum_m w_mc * p_m(c)``; both renormalised over classes.

    Returns:
        ``{rank: FloatTensor [B, C]}`` log-probabilities. With one model it is
        that model's log-probabilities.
    """
    check_mode(mode)
    if not score_dicts:
        raise ValueError("cannot ensemble zero models")
    if len(class_weights) != len(score_dicts):
        raise ValueError(f"got class weights for {len(class_weights)} models and scores for {len(score_dicts)}")
    combined: dict[str, Tensor] = {}
    for rank in dict.fromkeys(rank for scores in score_dicts for rank in scores):
        members = [i for i, scores in enumerate(score_dicts) if rank in scores]
        log_probs = torch.stack([torch.log_softmax(score_dicts[i][rank].float(), dim=-1) for i in members])  # [M, B, C]
        weights = torch.stack([torch.as_tensor(class_weights[i][rank], dtype=torch.float32) for i in members])  # [M, C]
        if weights.shape != (len(members), log_probs.shape[2]) or bool((weights < 0).any()):  # checked on the host
            raise ValueError(f"class weights of {rank!r} must be non-negative [models, {log_probs.shape[2]}], got {tuple(weights.shape)}")
        weights = weights.to(log_probs.device, non_blocking=True)
        totals = weights.sum(dim=0, keepdim=True)  # [1, C]
        weights = torch.where(totals > 0, weights / totals.clamp_min(1e-12), torch.full_like(weights, 1.0 / len(members)))
        if mode == "logits":
            mixed = torch.einsum("mc,mbc->bc", weights, log_probs)
        else:
            mixed = torch.logsumexp(log_probs + torch.log(weights)[:, None, :], dim=0)
        combined[rank] = torch.log_softmax(mixed, dim=-1)
    return combined


# ------------------------------------------------- per-class model weights
def per_class_accuracy(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class [C] among labelled samples (targets >= 0); NaN for classes without samples."""
    labelled = targets >= 0
    targets, predictions = targets[labelled], predictions[labelled]
    totals = np.bincount(targets, minlength=num_classes).astype(np.float64)
    correct = np.bincount(targets[targets == predictions], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, correct / np.maximum(totals, 1), np.nan)


def class_weights_from_accuracy(accuracy: np.ndarray, power: float = 2.0) -> np.ndarray:
    """Per-model, per-class ensemble weights [M, C] from accuracies [M, C] (NaN: no validation sample).

    ``w_mc = a_mc ** power / sum_m a_mc ** power``; NaN accuracies become the
    model's mean accuracy over its other classes; a class with zero total is
    weighted uniformly. Every column sums to one.
    """
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if accuracy.ndim != 2:
        raise ValueError(f"accuracy must be [models, classes], got shape {accuracy.shape}")
    if power <= 0:
        raise ValueError(f"the class-weight power must be > 0, got {power}")
    model_means = np.nanmean(np.where(np.isnan(accuracy).all(axis=1, keepdims=True), 0.0, accuracy), axis=1, keepdims=True)
    filled = np.where(np.isnan(accuracy), model_means, accuracy)
    scaled = filled**power
    totals = scaled.sum(axis=0, keepdims=True)
    uniform = np.full_like(scaled, 1.0 / len(scaled))
    return np.where(totals > 0, scaled / np.where(totals > 0, totals, 1.0), uniform)
