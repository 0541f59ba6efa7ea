"""Logit-adjusted cross-entropy (Menon et al. 2021) and balanced softmax (Ren et al. 2020).

On long-tailed data a softmax trained on the raw training distribution learns
p(y | x) under that distribution, i.e. it bakes the class prior into the
logits and under-predicts tail species.  Adding tau * log(prior) to the logits
during training makes the network fit the prior-free part only; at evaluation
the raw logits are then close to balanced, with no post-hoc correction.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .class_weights import counts_tensor
from .focal import FocalLoss

__all__ = ["BalancedSoftmaxLoss", "LogitAdjustedLoss", "log_prior"]


def log_prior(class_counts: Sequence[int] | Tensor) -> Tensor:
    """log of the class frequencies [C], float32, a count of 0 taken as 1 (see ``counts_tensor``).

    The one definition of the prior both the training-time adjustment here
    and the post-hoc one at evaluation (:mod:`herbarium.evaluation.posthoc`) use.
    """
    counts = counts_tensor(class_counts)  # [C], float64
    return torch.log(counts / counts.sum()).to(torch.float32)


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy (or focal loss) on logits + tau * log(prior) in training mode, on raw logits in eval mode.

    The prior is the training class frequency (counts of 0 raised to 1) and is
    kept as the ``log_prior`` buffer, so it moves with ``.to(device)`` and is
    saved in the state dict.  ``module.train()`` / ``module.eval()`` select the
    behaviour, so a validation loss computed in eval mode measures the
    predictions the model will actually make.

    Args:
        class_counts: [C] training counts of each class.
        tau: strength of the adjustment; 1 is balanced softmax.
        weight: optional [C] class weights (usually left None: the adjustment
            already re-balances, and both together over-correct).
        ignore_index: target value of samples without a label at this rank.
        gamma: focal term (1 - p_t) ** gamma on the adjusted probabilities; 0
            (the default) is plain logit-adjusted cross-entropy. The adjustment
            moves the margin towards rare classes, the focal term then spends
            the gradient on the hard samples among them.
    """

    def __init__(
        self,
        class_counts: Sequence[int] | Tensor,
        tau: float = 1.0,
        weight: Tensor | None = None,
        ignore_index: int = -1,
        gamma: float = 0.0,
    ) -> None:
        super().__init__()
        self.tau = float(tau)
        self.ignore_index = ignore_index
        self.focal = FocalLoss(gamma=gamma, weight=weight, ignore_index=ignore_index)
        self.register_buffer("log_prior", log_prior(class_counts))  # [C]

    @property
    def weight(self) -> Tensor | None:
        return self.focal.weight

    def adjust(self, logits: Tensor) -> Tensor:
        """logits [B, C] -> logits + tau * log_prior [B, C]."""
        if logits.shape[-1] != self.log_prior.shape[0]:
            raise ValueError(f"logits have {logits.shape[-1]} classes, class_counts {self.log_prior.shape[0]}")
        return logits + self.tau * self.log_prior.to(logits.dtype)

    def forward(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        """logits [B, C], target [B], sample_weight [B] or None -> scalar."""
        if self.training:
            logits = self.adjust(logits)
        return self.focal(logits, target, sample_weight)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.log_prior.shape[0]}, tau={self.tau}, gamma={self.focal.gamma}, "
            f"ignore_index={self.ignore_index}, weighted={self.weight is not None}"
        )


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax: logit adjustment with tau = 1 (Ren et al. 2020)."""

    def __init__(
        self,
        class_counts: Sequence[int] | Tensor,
        weight: Tensor | None = None,
        ignore_index: int = -1,
    ) -> None:
        super().__init__(class_counts, tau=1.0, weight=weight, ignore_index=ignore_index)
