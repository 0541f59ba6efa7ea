"""Noisy labels: loss-based sample reweighting (O2U) and cross-prediction cleaning.

* :mod:`herbarium.noisy.o2u`: per-sample losses over SGDR cycles become the
  next cycle's sample weights (``train --o2u``).
* :mod:`herbarium.noisy.cleaning`: train on one half, predict the other,
  flag disagreements and build a class-balanced clean subset
  (``herbarium clean-labels``).
* :mod:`herbarium.noisy.inject`: flip a fraction of labels, to measure both.
"""

from herbarium.noisy.o2u import O2U_WEIGHTINGS, O2UReweighter, loss_weights, per_sample_cross_entropy

__all__ = ["O2U_WEIGHTINGS", "O2UReweighter", "loss_weights", "per_sample_cross_entropy"]
