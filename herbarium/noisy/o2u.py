"""Loss-based sample reweighting over SGDR cycles, in the spirit of O2U-Net.

O2U-Net (Huang et al. 2019) trains with a cyclic learning rate and ranks
samples by their *normalised* loss averaged over a cycle: when the LR is high
the network cannot memorise, so a mislabelled sample keeps a high loss
relative to the others, cycle after cycle. The AliProducts solution turned
the ranking into weights: the losses of one cycle weight the samples in the
next.

What is recorded, per training sample (index into the train split):

1. every time the sample is trained on, the finest rank's cross-entropy (not
   the focal loss: focal shrinks exactly the large losses that mark noise);
2. at each epoch end, the sample's mean loss of the epoch minus the epoch's
   mean over all samples seen: this removes the effect of the LR, which moves
   every loss up and down over a cycle;
3. at each cycle end, the mean of step 2 over the cycle's epochs: the
   *normalised loss* ``l``, in nats above (> 0) or below (< 0) the average.

Weights for the next cycle, from ``l`` (``weighting``):

* ``exp``: ``w = exp(-max(l, 0) / temperature)``: samples at or below the
  average keep weight 1; above it, the weight falls by e per ``temperature``
  nats. With 20% flipped labels, clean samples sit below the average and the
  flipped ones several nats above it.
* ``rank``: ``w = 1 - r``, with ``r`` in [0, 1] the sample's percentile of
  ``l`` (0: lowest loss): a soft curriculum that ignores the loss scale.

Both are clipped to ``[floor, 1]``; samples never seen in the cycle keep
weight 1. Weights apply only after ``warmup_cycles`` cycles, once the
network has learnt enough for its losses to mean something. Everything lives
in tensors (``state_dict``) so a checkpoint resumes it exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

O2U_WEIGHTINGS = ("exp", "rank")


def per_sample_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Detached cross-entropy of each sample: logits [B, C], target [B] -> [B] (0 where ignored)."""
    return F.cross_entropy(logits.detach().float(), target, reduction="none", ignore_index=ignore_index)


def loss_weights(normalised_loss: torch.Tensor, weighting: str, temperature: float, floor: float) -> torch.Tensor:
    """Weights in [floor, 1] from normalised losses [N] (see the module docstring)."""
    if weighting == "exp":
        weights = torch.exp(-normalised_loss.clamp_min(0.0) / temperature)
    elif weighting == "rank":
        order = torch.argsort(normalised_loss, stable=True)
        percentile = torch.empty_like(normalised_loss)
        percentile[order] = torch.arange(len(order), dtype=normalised_loss.dtype, device=normalised_loss.device)
        weights = 1.0 - percentile / max(len(order) - 1, 1)
    else:
        raise ValueError(f"unknown O2U weighting {weighting!r}; choose one of {list(O2U_WEIGHTINGS)}")
    return weights.clamp(floor, 1.0)


class O2UReweighter:
    """Records per-sample losses and turns each SGDR cycle's into the next cycle's sample weights.

    Args:
        num_samples: size N of the training split.
        weighting, temperature, floor, warmup_cycles: see the module docstring.
        device: where the [N] buffers live (the training device).
    """

    def __init__(self, num_samples: int, weighting: str = "exp", temperature: float = 1.0, floor: float = 0.1,
                 warmup_cycles: int = 1, device: torch.device | str = "cpu") -> None:
        if weighting not in O2U_WEIGHTINGS:
            raise ValueError(f"unknown O2U weighting {weighting!r}; choose one of {list(O2U_WEIGHTINGS)}")
        if temperature <= 0:
            raise ValueError(f"O2U temperature must be > 0, got {temperature}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"O2U floor must be in [0, 1], got {floor}")
        if warmup_cycles < 0:
            raise ValueError(f"O2U warmup cycles must be >= 0, got {warmup_cycles}")
        self.weighting, self.temperature, self.floor, self.warmup_cycles = weighting, temperature, floor, warmup_cycles
        zeros = lambda: torch.zeros(num_samples, dtype=torch.float64, device=device)
        self.epoch_sum, self.epoch_count = zeros(), zeros()  # this epoch's raw losses per sample
        self.cycle_sum, self.cycle_count = zeros(), zeros()  # this cycle's normalised losses per sample
        self.normalised_loss = zeros()  # the last finished cycle's mean normalised loss
        self.weights = torch.ones(num_samples, dtype=torch.float32, device=device)
        self.cycles_done = 0

    @property
    def num_samples(self) -> int:
        return len(self.weights)

    @property
    def active(self) -> bool:
        """Whether the weights apply now (``warmup_cycles`` cycles are done)."""
        return self.cycles_done >= max(self.warmup_cycles, 1)

    def batch_weights(self, indices: torch.Tensor) -> torch.Tensor | None:
        """Sample weights [B] of a batch's train-split indices, or None before the weights apply."""
        if not self.active:
            return None
        return self.weights[indices.to(self.weights.device)]

    def record(self, indices: torch.Tensor, losses: torch.Tensor, labelled: torch.Tensor) -> None:
        """Add a batch's per-sample losses [B] for its train-split indices [B]; unlabelled or non-finite ones are skipped."""
        keep = labelled & torch.isfinite(losses)
        indices = indices.to(self.epoch_sum.device)[keep.to(self.epoch_sum.device)]
        self.epoch_sum.index_add_(0, indices, losses[keep].to(self.epoch_sum))
        self.epoch_count.index_add_(0, indices, torch.ones_like(indices, dtype=self.epoch_count.dtype))

    def end_epoch(self, all_reduce_sum: Callable[[torch.Tensor], Any] | None = None) -> None:
        """Normalise the epoch's losses by the epoch mean and add them to the cycle.

        Under DDP pass ``all_reduce_sum`` (sums a tensor across processes in
        place): every process then adds the same records and keeps the same weights.
        """
        if all_reduce_sum is not None:
            all_reduce_sum(self.epoch_sum)
            all_reduce_sum(self.epoch_count)
        seen = self.epoch_count > 0
        if bool(seen.any()):
            mean_loss = self.epoch_sum[seen] / self.epoch_count[seen]  # [S]
            self.cycle_sum[seen] += mean_loss - mean_loss.mean()
            self.cycle_count[seen] += 1
        self.epoch_sum.zero_()
        self.epoch_count.zero_()

    def end_cycle(self) -> dict[str, float]:
        """Turn the cycle's mean normalised losses into weights; returns a summary for the log."""
        seen = self.cycle_count > 0
        self.normalised_loss = torch.where(seen, self.cycle_sum / self.cycle_count.clamp_min(1), torch.zeros_like(self.cycle_sum))
        weights = torch.ones_like(self.weights)
        if bool(seen.any()):
            weights[seen] = loss_weights(self.normalised_loss[seen], self.weighting, self.temperature, self.floor).float()
        self.weights = weights
        self.cycle_sum.zero_()
        self.cycle_count.zero_()
        self.cycles_done += 1
        return self.summary()

    def summary(self) -> dict[str, float]:
        """Cycles done, whether the weights apply, their mean and the fraction below 0.5."""
        return {"cycles_done": self.cycles_done, "active": self.active, "mean_weight": float(self.weights.mean()),
                "fraction_below_half": float((self.weights < 0.5).float().mean())}

    def table(self, samples: Sequence[Any]) -> pd.DataFrame:
        """image_id, category_id, normalised_loss and weight of each sample (objects with ``image_id`` and
        ``category_id``, in train-split order), lowest weight first: the suspects to review."""
        return pd.DataFrame({
            "image_id": [sample.image_id for sample in samples],
            "category_id": [sample.category_id for sample in samples],
            "normalised_loss": self.normalised_loss.cpu().numpy(),
            "weight": self.weights.cpu().numpy(),
        }).sort_values("weight", kind="stable")

    def gather_to_main(self, all_reduce_sum: Callable[[torch.Tensor], Any], is_main: bool) -> None:
        """DDP, before a mid-epoch checkpoint: sum the epoch's records into the main process.

        The other processes keep zeros, so the sum at the epoch end still
        counts every record once, and the main process's checkpoint holds them all.
        """
        all_reduce_sum(self.epoch_sum)
        all_reduce_sum(self.epoch_count)
        if not is_main:
            self.epoch_sum.zero_()
            self.epoch_count.zero_()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch_sum": self.epoch_sum, "epoch_count": self.epoch_count, "cycle_sum": self.cycle_sum,
                "cycle_count": self.cycle_count, "normalised_loss": self.normalised_loss, "weights": self.weights,
                "cycles_done": self.cycles_done}

    def load_state_dict(self, state: dict[str, Any], is_main: bool = True) -> None:
        """Restore a ``state_dict``; under DDP only the main process takes the epoch's partial records."""
        if len(state["weights"]) != self.num_samples:
            raise ValueError(f"O2U state covers {len(state['weights'])} samples but the training split has {self.num_samples}")
        for name in ("epoch_sum", "epoch_count", "cycle_sum", "cycle_count", "normalised_loss", "weights"):
            getattr(self, name).copy_(state[name])
        self.cycles_done = int(state["cycles_done"])
        if not is_main:
            self.epoch_sum.zero_()
            self.epoch_count.zero_()
