"""Per-class weights for long-tailed data, and the weighted mean every loss here shares.

Herbarium counts run from thousands of sheets for common species down to one
or two for the tail, so an unweighted loss is dominated by the head classes.
The weights below re-balance that; the reduction helpers define one meaning of
"weighted mean" for all losses in this package, so that class weights,
per-sample weights (noisy-label re-weighting) and unlabelled targets
(``ignore_index``) compose the same way everywhere:

    loss = sum_i w_i * loss_i / sum_i w_i,
    w_i  = class_weight[target_i] * sample_weight_i * [target_i != ignore_index]

With only class weights this is exactly the mean that ``F.cross_entropy(weight=...)``
computes; with no weights at all it is the plain mean over labelled samples.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["CLASS_WEIGHTS", "class_weights", "counts_tensor", "sample_weights", "weighted_mean"]

CLASS_WEIGHTS: tuple[str, ...] = ("none", "inverse", "sqrt_inverse", "effective")


def counts_tensor(counts: Sequence[int] | Tensor) -> Tensor:
    """Class counts as a float64 tensor [C] with zeros raised to one.

    A class with no training samples still has a head output; treating it as
    seen once keeps 1/n, log-priors and the effective number finite.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()  # [C]
    if counts.numel() == 0:
        raise ValueError("class counts are empty")
    if bool((counts < 0).any()):
        raise ValueError("class counts must be non-negative")
    return counts.clamp_min(1.0)


def class_weights(counts: Sequence[int] | Tensor, mode: str, beta: float = 0.999) -> Tensor:
    """Per-class loss weights from training counts.

    Modes (see ``CLASS_WEIGHTS``):
      * ``none``: all ones.
      * ``inverse``: 1 / n_c.
      * ``sqrt_inverse``: 1 / sqrt(n_c), a milder re-balancing.
      * ``effective``: (1 - beta) / (1 - beta ** n_c), the inverse "effective
        number of samples" of Cui et al. 2019; it saturates for large n_c, so
        head classes are not pushed towards zero weight.

    Classes with count 0 are weighted as if they had count 1.  The weights are
    scaled to average 1 over classes, which keeps the loss on the same scale as
    the unweighted loss, so learning rates tuned without weights still apply.

    Returns:
        float32 tensor [C].
    """
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"unknown class weight mode {mode!r}; valid modes: {', '.join(CLASS_WEIGHTS)}")
    n = counts_tensor(counts)  # [C], float64 for the effective number's beta ** n
    if mode == "none":
        weights = torch.ones_like(n)
    elif mode == "inverse":
        weights = 1.0 / n
    elif mode == "sqrt_inverse":
        weights = n.rsqrt()
    else:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"effective-number beta must be in [0, 1), got {beta}")
        weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    weights = weights / weights.mean()
    return weights.to(torch.float32)


def sample_weights(
    target: Tensor,
    class_weight: Tensor | None,
    sample_weight: Tensor | None,
    ignore_index: int,
    dtype: torch.dtype,
) -> Tensor:
    """Weight w_i of each sample in the weighted mean; 0 for ``ignore_index`` targets.

    Args:
        target: [B] class indices; ``ignore_index`` marks samples unlabelled at this rank.
        class_weight: [C] or None.
        sample_weight: [B] or None, e.g. a per-sample confidence in the label.
        dtype: dtype of the result (the loss dtype).

    Returns:
        [B] tensor of weights.
    """
    valid = target != ignore_index  # [B]
    weight = valid.to(dtype)  # [B]
    if class_weight is not None:
        safe_target = torch.where(valid, target, torch.zeros_like(target))  # [B]
        weight = weight * class_weight.to(dtype)[safe_target]
    if sample_weight is not None:
        if sample_weight.shape != target.shape:
            raise ValueError(f"sample_weight shape {tuple(sample_weight.shape)} != target shape {tuple(target.shape)}")
        weight = weight * sample_weight.to(dtype)
    return weight


def weighted_mean(weighted_loss: Tensor, weight: Tensor) -> Tensor:
    """sum(weighted_loss) / sum(weight), and 0 (with a grad_fn) when every weight is 0.

    ``weighted_loss`` is already multiplied by the weights.  The denominator is
    clamped away from zero rather than tested, so there is no host sync: when all
    weights are zero the numerator is exactly zero, and so is its gradient.
    """
    return weighted_loss.sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)
