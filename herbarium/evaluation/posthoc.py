"""Post-hoc logit adjustment (Menon et al. 2021): each rank's logits minus ``tau * log(prior)`` at evaluation.

A softmax trained with plain cross-entropy on a long tail learns the
training distribution's class prior into its logits and under-predicts the
rare classes; subtracting ``tau * log(prior)`` (tau = 1 for a calibrated
model) turns its argmax towards the balanced error that macro-F1 rewards.
A run trained with logit-adjusted cross-entropy (herbarium's default loss)
is already close to balanced, yet a small extra tau may still help. Which
tau is best depends on the run, so ``auto`` measures it: the run's own
validation split is scored once per tau of :data:`TAU_GRID`, from logits
computed once.

The prior of a rank is its training split's class frequencies, a count of 0
taken as 1 (:func:`herbarium.losses.logit_adjusted.log_prior`, as the loss
does). The adjustment is applied to every view's logits, before views and
models are averaged, so every variant (heads, consistent, hybrid) decodes
adjusted scores. Tau 0 subtracts nothing: the evaluation is today's, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from herbarium.config import TrainConfig
from herbarium.data.sample_table import class_counts
from herbarium.data.splits import read_train_val
from herbarium.errors import PATH_ERRORS, HerbariumError, UsageError
from herbarium.losses.logit_adjusted import log_prior
from herbarium.taxonomy import Taxonomy

AUTO = "auto"
TAU_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # the taus ``auto`` tries; 1 is the full correction of a calibrated model


def parse_tau(text: str) -> float | str:
    """``auto``, or a finite tau >= 0 (a negative one would push the predictions further towards the common classes)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        tau = float(text)
    except ValueError:
        tau = math.nan
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"expected a number >= 0 or {AUTO!r}, got {text!r}")
    return tau


def tau_offsets(train_counts: Mapping[str, Sequence[int]], classes_by_rank: Mapping[str, int], tau: float,
                device: torch.device) -> dict[str, Tensor] | None:
    """``{rank: tau * log(prior) [C]}`` on ``device`` for each head, to subtract from its logits; None at tau 0."""
    if tau == 0:
        return None
    for rank, classes in classes_by_rank.items():
        if len(train_counts.get(rank, ())) != classes:
            raise UsageError(f"post-hoc tau {tau:g}: the {rank} head has {classes} classes but the run's training counts "
                             f"list {len(train_counts.get(rank, ()))} at that rank")
    return {rank: (tau * log_prior(train_counts[rank])).to(device) for rank in classes_by_rank}


def adjust_logits(logits: Mapping[str, Tensor], offsets: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``logits[rank] - offsets[rank]`` for every rank (logits [..., C], e.g. [views, batch, C]); unchanged without offsets."""
    if offsets is None:
        return dict(logits)
    return {rank: value - offsets[rank] for rank, value in logits.items()}


def training_counts(recorded: Mapping[str, Sequence[int]], config: TrainConfig, taxonomy: Taxonomy,
                    ranks: Sequence[str], source: Any) -> dict[str, list[int]]:
    """The run's training images per class at each of ``ranks``: as training recorded them, else counted again.

    Training records them in the run's normalization.json; for a run that
    did not, the training split named in its config.json is read (with its
    hold-out, subset and validation split as in training) and counted in one
    bincount per rank. ``source`` names the run in the error raised when
    neither is available.
    """
    missing = [rank for rank in ranks if rank not in recorded]
    if not missing:
        return {rank: list(recorded[rank]) for rank in recorded}
    try:
        train, _ = read_train_val(config)
    except (HerbariumError, *PATH_ERRORS) as error:
        raise UsageError(f"{source}: --posthoc-tau needs the training class counts at {', '.join(missing)}; the run "
                         f"did not record them and its training split could not be read ({error})") from None
    counted = {rank: class_counts(train.samples, taxonomy, rank) for rank in missing}
    return {**{rank: list(counts) for rank, counts in recorded.items()}, **counted}


@dataclass
class TauChoice:
    """The tau an evaluation adjusted its logits with, and why."""

    tau: float
    reason: str
    validation_macro_f1: dict[float, float] = field(default_factory=dict)  # tau -> the headline variant's finest macro-F1

    def to_dict(self) -> dict[str, Any]:
        """As metrics.json holds it (JSON keys are text: the taus as ``0.25``)."""
        return {"tau": self.tau, "reason": self.reason,
                "validation_macro_f1": {f"{tau:g}": score for tau, score in self.validation_macro_f1.items()}}


def fixed_tau(tau: float) -> TauChoice:
    """A tau the user gave (0 included): nothing was measured."""
    return TauChoice(tau, "given with --posthoc-tau")


def choose_tau(scores: Mapping[float, float], variant: str, rank: str, where: str) -> TauChoice:
    """The tau with the best ``scores`` (the headline ``variant``'s macro-F1 at ``rank`` per tau); a tie goes to the smaller tau,
    the lesser change to the trained model."""
    best = min(scores, key=lambda tau: (-scores[tau], tau))
    grid = ", ".join(f"{tau:g}" for tau in sorted(scores))
    return TauChoice(best, f"auto: best {rank} macro-F1 of {variant} ({scores[best]:.3f}) on {where} among tau {grid}",
                     dict(scores))


def no_validation_tau() -> TauChoice:
    """``auto`` with nothing to choose on: the logits are left as trained."""
    return TauChoice(0.0, "auto: the run has no labelled validation split to choose on, so no adjustment (tau 0)")
