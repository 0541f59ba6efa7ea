"""Build losses from their CLI names.

``LOSSES`` maps each name to a small builder; every builder receives the
class counts, the class weights (or None) and the loss settings, and picks the
settings it needs.  Defaults live in ``build_loss``'s signature only.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable, Mapping, Sequence

from torch import Tensor, nn

from .class_weights import class_weights
from .focal import FocalLoss
from .label_smoothing import LabelSmoothingCrossEntropy
from .logit_adjusted import BalancedSoftmaxLoss, LogitAdjustedLoss
from .multi_rank import MultiRankLoss
from .symmetric import SymmetricCrossEntropy

__all__ = [
    "LOSSES", "LOSS_SETTINGS", "SOFT_TARGET_LOSSES", "build_loss", "build_multi_rank_loss", "loss_settings_read",
    "unread_loss_settings",
]

LossBuilder = Callable[..., nn.Module]


def _cross_entropy(counts: Sequence[int], weight: Tensor | None, **_: float) -> nn.Module:
    # Focal loss with gamma 0 is exactly cross-entropy, and shares the weighted-mean reduction.
    return FocalLoss(gamma=0.0, weight=weight)


def _focal(counts: Sequence[int], weight: Tensor | None, *, gamma: float, **_: float) -> nn.Module:
    return FocalLoss(gamma=gamma, weight=weight)


def _label_smoothing(counts: Sequence[int], weight: Tensor | None, *, smoothing: float, **_: float) -> nn.Module:
    return LabelSmoothingCrossEntropy(smoothing=smoothing, weight=weight)


def _logit_adjusted(counts: Sequence[int], weight: Tensor | None, *, tau: float, **_: float) -> nn.Module:
    return LogitAdjustedLoss(counts, tau=tau, weight=weight)


def _focal_logit_adjusted(counts: Sequence[int], weight: Tensor | None, *, tau: float, gamma: float, **_: float) -> nn.Module:
    return LogitAdjustedLoss(counts, tau=tau, weight=weight, gamma=gamma)


def _balanced_softmax(counts: Sequence[int], weight: Tensor | None, **_: float) -> nn.Module:
    return BalancedSoftmaxLoss(counts, weight=weight)


def _symmetric(
    counts: Sequence[int], weight: Tensor | None, *, sce_alpha: float, sce_beta: float, **_: float
) -> nn.Module:
    return SymmetricCrossEntropy(alpha=sce_alpha, beta=sce_beta, weight=weight)


LOSSES: dict[str, LossBuilder] = {
    "ce": _cross_entropy,
    "focal": _focal,
    "label_smoothing": _label_smoothing,
    "logit_adjusted": _logit_adjusted,
    "focal_logit_adjusted": _focal_logit_adjusted,
    "balanced_softmax": _balanced_softmax,
    "sce": _symmetric,
}

# Losses that also take [B, C] probability targets (mixup / cutmix): the ones built on FocalLoss.
SOFT_TARGET_LOSSES = ("ce", "focal", "logit_adjusted", "focal_logit_adjusted", "balanced_softmax")


def loss_settings_read(name: str) -> tuple[str, ...]:
    """The settings of ``build_loss`` that loss ``name`` reads: its builder's keyword-only parameters."""
    return _keyword_only(LOSSES[name])


def _keyword_only(function: Callable[..., object]) -> tuple[str, ...]:
    parameters = inspect.signature(function).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def unread_loss_settings(settings: Iterable[str], names: Iterable[str], class_weight_mode: str = "none") -> list[str]:
    """The ones among ``settings`` that neither the losses ``names`` nor the class weights read.

    A setting given for a loss the run does not use changes nothing; the
    command line warns about these (``--gamma`` with the default
    logit-adjusted loss, say) instead of training without them in silence.
    """
    read = {setting for name in set(names) for setting in loss_settings_read(name)}
    if class_weight_mode == "effective":
        read.add("beta")
    return [setting for setting in settings if setting not in read]


def build_loss(
    name: str,
    class_counts: Sequence[int],
    class_weight_mode: str = "none",
    *,
    gamma: float = 2.0,
    smoothing: float = 0.1,
    tau: float = 1.0,
    beta: float = 0.999,
    sce_alpha: float = 0.1,
    sce_beta: float = 1.0,
) -> nn.Module:
    """One rank's loss by name (see ``LOSSES``), with class weights from ``class_counts``.

    Args:
        name: a key of ``LOSSES``.
        class_counts: [C] training counts of this rank's classes; they set the
            class weights and the logit-adjustment prior.
        class_weight_mode: a mode of ``CLASS_WEIGHTS``; ``none`` builds an
            unweighted loss.  Every loss accepts class weights.
        gamma: focal-loss focusing parameter.
        smoothing: label-smoothing mass.
        tau: logit-adjustment strength.
        beta: effective-number beta of the ``effective`` class weights.
        sce_alpha, sce_beta: weights of the CE and reverse-CE terms of ``sce``.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    weight = None if class_weight_mode == "none" else class_weights(class_counts, class_weight_mode, beta=beta)
    return LOSSES[name](
        class_counts, weight, gamma=gamma, smoothing=smoothing, tau=tau, sce_alpha=sce_alpha, sce_beta=sce_beta
    )


LOSS_SETTINGS = _keyword_only(build_loss)  # gamma, smoothing, tau, beta, sce_alpha, sce_beta: shared by every rank


def build_multi_rank_loss(
    names_by_rank: Mapping[str, str],
    counts_by_rank: Mapping[str, Sequence[int]],
    rank_weights: Mapping[str, float],
    class_weight_mode: str = "none",
    **loss_settings: float,
) -> MultiRankLoss:
    """A ``MultiRankLoss`` with ``build_loss(names_by_rank[r], counts_by_rank[r], ...)`` per rank.

    ``loss_settings`` are the keyword settings of ``build_loss`` (gamma, tau, ...),
    shared by all ranks.  The ranks of the three mappings must agree.
    """
    if set(counts_by_rank) != set(names_by_rank):
        raise ValueError(f"counts_by_rank ranks {sorted(counts_by_rank)} != loss ranks {sorted(names_by_rank)}")
    losses = {
        rank: build_loss(name, counts_by_rank[rank], class_weight_mode, **loss_settings)
        for rank, name in names_by_rank.items()
    }
    return MultiRankLoss(losses, rank_weights)
