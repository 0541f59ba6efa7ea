"""Symmetric cross-entropy (Wang et al. 2019) for noisy labels.

Cross-entropy keeps pushing a confidently wrong label's probability towards 1,
with an unbounded gradient, so mislabelled sheets pull hard on the model.
The reverse term swaps prediction and label: -sum_c p_c * log q_c, with the
one-hot label q clamped so that log 0 becomes log(label_clamp).  It is bounded
and tolerant of label noise; alpha * CE keeps enough signal to fit clean data.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .class_weights import sample_weights, weighted_mean

__all__ = ["SymmetricCrossEntropy"]


class SymmetricCrossEntropy(nn.Module):
    """alpha * CE + beta * RCE, RCE = -sum_c p_c * log(clamp(one_hot_c, label_clamp, 1)).

    The number of classes is taken from the logits.  Because log q_c is 0 for
    the target and log(label_clamp) elsewhere, RCE reduces to
    -log(label_clamp) * (1 - p_target), which is what is computed (O(B), not
    O(B * C), which matters with tens of thousands of species).

    Args:
        alpha: weight of the cross-entropy term.
        beta: weight of the reverse cross-entropy term.
        label_clamp: value that replaces the zeros of the one-hot label before
            the log; the paper's A = -4 is the log10 of the default 1e-4.
        weight: optional [C] class weights, applied to the whole per-sample loss.
        ignore_index: target value of samples without a label at this rank.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 1.0,
        label_clamp: float = 1e-4,
        weight: Tensor | None = None,
        ignore_index: int = -1,
    ) -> None:
        super().__init__()
        if not 0.0 < label_clamp < 1.0:
            raise ValueError(f"label_clamp must be in (0, 1), got {label_clamp}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.label_clamp = float(label_clamp)
        self.ignore_index = ignore_index
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        """logits [B, C], target [B], sample_weight [B] or None -> scalar."""
        nll = F.cross_entropy(logits, target, reduction="none", ignore_index=self.ignore_index)  # [B], 0 if ignored
        target_prob = torch.exp(-nll)  # [B], 1 if ignored, so RCE is 0 there too
        reverse = -math.log(self.label_clamp) * (1.0 - target_prob)  # [B]
        per_sample = self.alpha * nll + self.beta * reverse  # [B]
        weight = sample_weights(target, self.weight, sample_weight, self.ignore_index, per_sample.dtype)  # [B]
        return weighted_mean(weight * per_sample, weight)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, label_clamp={self.label_clamp}, "
            f"ignore_index={self.ignore_index}, weighted={self.weight is not None}"
        )
