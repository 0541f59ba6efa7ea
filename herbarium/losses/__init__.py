"""Losses for hierarchical, long-tailed, noisy-label classification: one module per loss.

Every loss takes ``(logits [B, C], target [B], sample_weight [B] | None)``,
skips targets equal to its ``ignore_index`` (samples unlabelled at a rank) and
reduces with the same weighted mean (see ``class_weights``).
"""
from .class_weights import CLASS_WEIGHTS, class_weights
from .factory import LOSS_SETTINGS, LOSSES, build_loss, build_multi_rank_loss, unread_loss_settings
from .focal import FocalLoss
from .label_smoothing import LabelSmoothingCrossEntropy
from .logit_adjusted import BalancedSoftmaxLoss, LogitAdjustedLoss
from .multi_rank import MultiRankLoss
from .symmetric import SymmetricCrossEntropy

__all__ = [
    "CLASS_WEIGHTS",
    "LOSSES",
    "LOSS_SETTINGS",
    "BalancedSoftmaxLoss",
    "FocalLoss",
    "LabelSmoothingCrossEntropy",
    "LogitAdjustedLoss",
    "MultiRankLoss",
    "SymmetricCrossEntropy",
    "build_loss",
    "build_multi_rank_loss",
    "class_weights",
    "unread_loss_settings",
]
