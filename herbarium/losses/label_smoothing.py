"""Label-smoothed cross-entropy (Szegedy et al. 2016).

Herbarium labels are noisy and neighbouring species look alike; moving a
little target mass off the labelled class keeps the model from becoming
over-confident on labels that may be wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .class_weights import sample_weights, weighted_mean

__all__ = ["LabelSmoothingCrossEntropy"]


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy against (1 - smoothing) * one_hot + smoothing / C.

    Uses ``F.cross_entropy(label_smoothing=...)`` per sample, so with class
    weights it keeps PyTorch's definition (the smoothing term weights class c
    by weight[c], the mean divides by the target classes' weights); it equals
    ``F.cross_entropy(weight=..., label_smoothing=...)`` when no per-sample
    weight is given.

    Args:
        smoothing: target mass spread uniformly over all classes, in [0, 1).
        weight: optional [C] class weights.
        ignore_index: target value of samples without a label at this rank.
    """

    def __init__(self, smoothing: float = 0.1, weight: Tensor | None = None, ignore_index: int = -1) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)
        self.ignore_index = ignore_index
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        """logits [B, C], target [B], sample_weight [B] or None -> scalar."""
        # Already multiplied by the class weights, and 0 for ignored targets.
        class_weighted = F.cross_entropy(
            logits,
            target,
            weight=self.weight,
            reduction="none",
            ignore_index=self.ignore_index,
            label_smoothing=self.smoothing,
        )  # [B]
        weight = sample_weights(target, self.weight, sample_weight, self.ignore_index, class_weighted.dtype)  # [B]
        if sample_weight is not None:
            class_weighted = class_weighted * sample_weight.to(class_weighted.dtype)
        return weighted_mean(class_weighted, weight)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, ignore_index={self.ignore_index}, weighted={self.weight is not None}"
