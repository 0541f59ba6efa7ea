"""Focal loss (Lin et al. 2017), also the package's plain cross-entropy (gamma = 0).

(1 - p_t) ** gamma scales down samples the model already gets right, so the
gradient budget goes to hard and rare examples instead of the thousands of
easy head-class sheets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .class_weights import sample_weights, weighted_mean

__all__ = ["FocalLoss"]


class FocalLoss(nn.Module):
    """Focal loss with class weights, per-sample weights and ignored targets.

    loss_i = -(1 - p_i) ** gamma * log p_i, with p_i the softmax probability of
    the target class, reduced by the package's weighted mean (see
    ``herbarium.losses.class_weights``).  With ``gamma == 0`` this is exactly
    ``F.cross_entropy``, with or without ``weight``.

    Args:
        gamma: focusing parameter; 0 gives cross-entropy.
        weight: optional [C] class weights (see ``class_weights``).
        ignore_index: target value of samples without a label at this rank.
    """

    def __init__(self, gamma: float = 2.0, weight: Tensor | None = None, ignore_index: int = -1) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        """logits [B, C], target [B] class indices or [B, C] class probabilities, sample_weight [B] or None -> scalar.

        Probability targets (mixup / cutmix) weigh each sample by its target's
        mass, so a row of zeros (no label at this rank) is ignored, and by its
        expected class weight.
        """
        if target.dim() == 2:
            return self._soft_target_loss(logits, target, sample_weight)
        nll = F.cross_entropy(logits, target, reduction="none", ignore_index=self.ignore_index)  # [B], 0 if ignored
        if self.gamma == 0.0:
            # Skip (1 - p) ** 0: its derivative is 0 * (1 - p) ** -1, which is NaN at p == 1.
            per_sample = nll
        else:
            target_prob = torch.exp(-nll)  # [B]
            per_sample = (1.0 - target_prob).clamp_min(0.0).pow(self.gamma) * nll  # [B]
        weight = sample_weights(target, self.weight, sample_weight, self.ignore_index, per_sample.dtype)  # [B]
        return weighted_mean(weight * per_sample, weight)

    def _soft_target_loss(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None) -> Tensor:
        mass = target.sum(dim=1)  # [B]: 1 for a labelled sample, 0 for one without a label at this rank
        nll = -(target * F.log_softmax(logits, dim=1)).sum(dim=1) / mass.clamp_min(1e-12)  # [B]
        per_sample = nll if self.gamma == 0.0 else (1.0 - torch.exp(-nll)).clamp_min(0.0).pow(self.gamma) * nll
        weight = mass.to(per_sample.dtype) if self.weight is None else target.to(per_sample.dtype) @ self.weight.to(per_sample.dtype)
        if sample_weight is not None:
            weight = weight * sample_weight.to(per_sample.dtype)
        return weighted_mean(weight * per_sample, weight)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, ignore_index={self.ignore_index}, weighted={self.weight is not None}"
