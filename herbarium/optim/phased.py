"""An optimizer that switches between Adam, SGD and others by epoch ("AdamEva").

Adam makes fast early progress but often generalises worse than SGD with
momentum; the Herbarium 2020 recipe wanted to start with Adam, move to SGD,
and possibly return to Adam, which a one-optimizer training loop cannot do.
``PhasedOptimizer`` owns one torch optimizer per optimizer name, all over the
same parameters, and steps only the active one.

Rules, in the words the README uses:

* **Phases.** A run is a list of phases such as ``adam:0,sgd:10,adam:20``: the
  optimizer name and the epoch it starts.  Each phase has its own base LR
  (defaults: adam 3e-4, adamw 1e-3, sgd 0.05, rmsprop 1e-3) and weight decay.
* **Learning rate across a switch.** LR = phase base LR * schedule factor at
  the global step.  The schedule runs on the global step of the whole run and
  is not restarted by a switch, so a cosine schedule keeps decaying through
  Adam -> SGD and SGD picks up at the same point of the curve, scaled by its
  own base LR.
* **State across re-entry.** Each optimizer keeps its own state while
  inactive: going Adam -> SGD -> Adam resumes Adam's moment estimates and step
  count (and SGD's momentum buffer on its own return).  Phases with the same
  name share one optimizer.
* **Plateau switching.** With ``plateau_patience=k``, ``report_metric(value)``
  (higher is better, once per epoch) counts epochs without a new best since
  the current phase began; after k of them the next phase in the list is
  brought forward and starts at the next ``start_epoch``.  A plateau never
  delays or shifts later phases: every phase still starts no later than its
  own start epoch, and phases only move forward.
* **Mixed precision.** ``step(scaler)`` calls ``scaler.step`` on the active
  optimizer; for gradient clipping call ``scaler.unscale_(opt.active)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from .schedules import Schedule

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_WEIGHT_DECAY",
    "OPTIMIZERS",
    "Phase",
    "PhasedOptimizer",
    "parse_phases",
]

ParamGroups = list[dict[str, Any]]


def _adam(param_groups: ParamGroups, lr: float, weight_decay: float) -> Optimizer:
    return torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)


def _adamw(param_groups: ParamGroups, lr: float, weight_decay: float) -> Optimizer:
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


def _sgd(param_groups: ParamGroups, lr: float, weight_decay: float) -> Optimizer:
    return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _rmsprop(param_groups: ParamGroups, lr: float, weight_decay: float) -> Optimizer:
    return torch.optim.RMSprop(param_groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[[ParamGroups, float, float], Optimizer]] = {
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,  # momentum 0.9, Nesterov
    "rmsprop": _rmsprop,  # momentum 0.9
}
DEFAULT_LRS: dict[str, float] = {"adam": 3e-4, "adamw": 1e-3, "sgd": 0.05, "rmsprop": 1e-3}
DEFAULT_WEIGHT_DECAY: dict[str, float] = {"adam": 0.0, "adamw": 0.05, "sgd": 1e-4, "rmsprop": 0.0}


@dataclass(frozen=True)
class Phase:
    """One optimizer phase; ``lr`` and ``weight_decay`` default per name (``DEFAULT_LRS``, ``DEFAULT_WEIGHT_DECAY``)."""

    name: str
    start_epoch: int
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
        if self.start_epoch < 0:
            raise ValueError(f"phase {self.name!r} starts at epoch {self.start_epoch} < 0")
        # Frozen dataclass: fill the per-name defaults through object.__setattr__.
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LRS[self.name])
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", DEFAULT_WEIGHT_DECAY[self.name])
        if not self.lr > 0:  # nan too
            raise ValueError(f"phase {self.name!r} needs lr > 0, got {self.lr}")


def _check_phases(phases: list[Phase]) -> None:
    if not phases:
        raise ValueError("at least one optimizer phase is needed")
    if phases[0].start_epoch != 0:
        raise ValueError(f"the first phase must start at epoch 0, not {phases[0].start_epoch}")
    for previous, phase in zip(phases, phases[1:]):
        if phase.start_epoch <= previous.start_epoch:
            raise ValueError(
                f"phase starts must strictly increase: {previous.name}:{previous.start_epoch} "
                f"then {phase.name}:{phase.start_epoch}"
            )


_PHASE_FORMS = "NAME:START_EPOCH or NAME@LR:START_EPOCH, comma-separated, e.g. adam:0,sgd@0.05:10,adam:20"


def parse_phases(
    spec: str,
    lrs: Mapping[str, float] | None = None,
    weight_decays: Mapping[str, float] | None = None,
) -> list[Phase]:
    """Read ``adam:0,sgd:10,adam:20`` (optionally ``adam@3e-4:0,sgd@0.05:10``) into phases.

    The LR of a phase is, first found: the ``@LR`` in the spec, ``lrs[name]``,
    ``DEFAULT_LRS[name]``; its weight decay ``weight_decays[name]``, else
    ``DEFAULT_WEIGHT_DECAY[name]``.  The first phase must start at epoch 0 and
    starts must strictly increase.
    """
    lrs = lrs or {}
    weight_decays = weight_decays or {}
    phases: list[Phase] = []
    for entry in spec.split(","):
        head, sep, start = entry.strip().rpartition(":")
        name, _, lr_text = head.partition("@")
        if not sep or not name:
            raise ValueError(f"bad phase {entry!r} in {spec!r}; expected {_PHASE_FORMS}")
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r} in {spec!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
        try:
            start_epoch = int(start)
            lr = float(lr_text) if lr_text else lrs.get(name)
        except ValueError:
            raise ValueError(f"bad phase {entry!r} in {spec!r}; expected {_PHASE_FORMS}") from None
        phases.append(Phase(name, start_epoch, lr, weight_decays.get(name)))
    _check_phases(phases)
    return phases


def phase_spec(text: str) -> str:
    """``--optim``'s value, checked by :func:`parse_phases` as it is parsed, so that a bad phase names the option."""
    parse_phases(text)
    return text


class PhasedOptimizer:
    """Steps one of several optimizers over the same parameters, chosen by epoch or plateau.

    Call ``start_epoch(epoch)`` at the start of every epoch, ``zero_grad()`` /
    ``step()`` per batch, and ``report_metric(value)`` after each validation if
    ``plateau_patience`` is set.  See the module docstring for the LR and state rules.

    Args:
        params: parameters, or param groups (dicts).  A group's own
            ``weight_decay`` is kept in every phase (e.g. 0 for norms and
            biases); a group's ``lr_scale`` multiplies its LR.
        phases: the phases, first at epoch 0, starts strictly increasing.
        schedule: LR factor as a function of the global step.
        steps_per_epoch: optimizer steps per epoch, to convert the schedule's epochs.
        total_epochs: length of the run, for schedules that end (cosine).
        plateau_patience: epochs without improvement before the next phase is
            brought forward; None disables plateau switching.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        phases: list[Phase],
        schedule: Schedule,
        steps_per_epoch: int,
        total_epochs: int,
        plateau_patience: int | None = None,
    ) -> None:
        phases = list(phases)
        _check_phases(phases)
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
        if plateau_patience is not None and plateau_patience < 1:
            raise ValueError(f"plateau_patience must be >= 1 or None, got {plateau_patience}")
        param_groups = list(params)
        if not param_groups:
            raise ValueError("PhasedOptimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        self.phases = phases
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.total_epochs = total_epochs
        self.plateau_patience = plateau_patience
        self._own_weight_decay = ["weight_decay" in group for group in param_groups]
        # One optimizer per name, created now so that every state_dict exists from the start.
        self.optimizers: dict[str, Optimizer] = {}
        for phase in phases:
            if phase.name not in self.optimizers:
                groups = [{**group, "params": list(group["params"])} for group in param_groups]
                self.optimizers[phase.name] = OPTIMIZERS[phase.name](groups, phase.lr, phase.weight_decay)
        self.global_step = 0
        self.epoch = 0
        self.active_index = 0
        self.history: list[dict[str, Any]] = []
        self._plateau_floor = 0  # index of the earliest phase a plateau has brought forward
        self._best_metric: float | None = None
        self._bad_epochs = 0
        self._configure_active()

    @property
    def active_phase(self) -> Phase:
        return self.phases[self.active_index]

    @property
    def active(self) -> Optimizer:
        """The torch optimizer of the current phase (pass this to ``GradScaler``)."""
        return self.optimizers[self.active_phase.name]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.active.param_groups

    def current_lr(self) -> float:
        """Base LR of the active phase times the schedule factor at the global step (the next step's LR)."""
        factor = self.schedule.factor(self.global_step, self.steps_per_epoch, self.total_epochs)
        return self.active_phase.lr * factor

    def _configure_active(self) -> None:
        """Give the active optimizer its phase's weight decay and the LR of the current step."""
        lr = self.current_lr()
        for group, own_weight_decay in zip(self.active.param_groups, self._own_weight_decay):
            if not own_weight_decay:
                group["weight_decay"] = self.active_phase.weight_decay
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # All optimizers hold the same parameters, so clearing through one clears them all.
        self.active.zero_grad(set_to_none=set_to_none)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Set the LR for the global step, step the active optimizer, advance the global step.

        With a ``GradScaler``, ``scaler.step`` may skip the update on overflow;
        the global step still advances, as the schedule counts batches.
        """
        self._configure_active()
        if scaler is None:
            self.active.step()
        else:
            scaler.step(self.active)
        self.global_step += 1

    def skip_step(self) -> None:
        """Advance the global step without updating (a step skipped for a non-finite loss): the schedule counts steps."""
        self.global_step += 1

    def start_epoch(self, epoch: int) -> bool:
        """Enter ``epoch``: switch phase if one starts now or a plateau brought one forward.

        Returns True when the phase changed.
        """
        self.epoch = epoch
        scheduled = max(i for i, phase in enumerate(self.phases) if phase.start_epoch <= epoch)
        target = max(scheduled, self._plateau_floor)
        if target == self.active_index:
            return False
        self.history.append(
            {
                "epoch": epoch,
                "step": self.global_step,
                "from": self.active_phase.name,
                "to": self.phases[target].name,
                "reason": "schedule" if target == scheduled else "plateau",
            }
        )
        self.active_index = target
        self._best_metric, self._bad_epochs = None, 0  # each phase is judged on its own epochs
        self._configure_active()
        return True

    def report_metric(self, value: float) -> bool:
        """Record this epoch's validation metric (higher is better).

        Returns True when it brings the next phase forward (from the next ``start_epoch``).
        """
        value = float(value)
        if self._best_metric is None or value > self._best_metric:
            self._best_metric, self._bad_epochs = value, 0
        else:
            self._bad_epochs += 1
        can_advance = self.active_index + 1 < len(self.phases) and self._plateau_floor <= self.active_index
        if self.plateau_patience is not None and self._bad_epochs >= self.plateau_patience and can_advance:
            self._plateau_floor = self.active_index + 1
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; only tensors, numbers, strings, lists and dicts (weights_only-safe)."""
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "active_index": self.active_index,
            "phases": [[phase.name, phase.start_epoch] for phase in self.phases],
            "plateau": {"floor": self._plateau_floor, "best": self._best_metric, "bad_epochs": self._bad_epochs},
            "history": [dict(entry) for entry in self.history],
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()``.  The phase names and start epochs must match;
        base LRs and weight decays come from this object's phases, so they may be changed on resume."""
        saved = [[name, int(start)] for name, start in state["phases"]]
        current = [[phase.name, phase.start_epoch] for phase in self.phases]
        if saved != current:
            raise ValueError(f"saved phases {saved} do not match this optimizer's phases {current}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.active_index = int(state["active_index"])
        plateau = state["plateau"]
        self._plateau_floor = int(plateau["floor"])
        self._best_metric = None if plateau["best"] is None else float(plateau["best"])
        self._bad_epochs = int(plateau["bad_epochs"])
        self.history = [dict(entry) for entry in state["history"]]
        self._configure_active()

    def __repr__(self) -> str:
        phases = ",".join(f"{phase.name}@{phase.lr:g}:{phase.start_epoch}" for phase in self.phases)
        return (
            f"{type(self).__name__}(phases={phases}, schedule={self.schedule}, active={self.active_phase.name}, "
            f"global_step={self.global_step})"
        )
