"""Learning-rate schedules as pure functions of an explicit step.

Each function returns a unitless factor (typically in [0, 1]) that multiplies
a base learning rate; the caller owns the step counter, so a schedule has no
state to save and is trivial to test.  ``Schedule`` wraps one of them for the
CLI, where periods are given in epochs (``parse_schedule("sgdr:5:mult=2")``),
and converts epochs to steps when asked for a factor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

__all__ = [
    "SCHEDULES",
    "CyclePosition",
    "Schedule",
    "constant",
    "cosine_restarts",
    "cycle_index",
    "parse_schedule",
    "step_decay",
    "warmup_cosine",
]


def constant(step: int) -> float:
    """Factor 1 at every step."""
    return 1.0


def step_decay(step: int, step_size: int, gamma: float = 0.5) -> float:
    """gamma ** (step // step_size): multiply by gamma every ``step_size`` steps.

    The Herbarium 2020 baseline halved the LR every 5 or 10 epochs.
    """
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    return gamma ** (step // step_size)


def _cosine(progress: float, min_factor: float) -> float:
    """1 at progress 0, min_factor at progress 1, half-cosine in between."""
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0) -> float:
    """Linear warmup to 1, then cosine decay to ``min_factor`` at ``total_steps``.

    1. step < warmup_steps: (step + 1) / warmup_steps, so the first step is not wasted at LR 0.
    2. warmup_steps <= step < total_steps: cosine from 1 down towards min_factor.
    3. step >= total_steps: min_factor.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_factor
    return _cosine((step - warmup_steps) / (total_steps - warmup_steps), min_factor)


class CyclePosition(NamedTuple):
    """Where a step falls in a cosine-restart schedule."""

    index: int  # 0-based cycle number
    start: int  # first step of the cycle
    length: int  # steps in the cycle
    is_last: bool  # step is the cycle's last step: the LR is at its minimum, time for a snapshot


def cycle_index(step: int, cycle_steps: int, cycle_mult: float = 1.0) -> CyclePosition:
    """The SGDR cycle that contains ``step``.

    Cycle i lasts round(cycle_steps * cycle_mult ** i) steps, so with an
    integer ``cycle_mult`` and ``cycle_steps`` a whole number of epochs, every
    cycle ends on an epoch boundary.  Snapshot ensembles save a model when
    ``is_last`` is true.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cycle_steps <= 0:
        raise ValueError(f"cycle_steps must be > 0, got {cycle_steps}")
    if cycle_mult < 1.0:
        raise ValueError(f"cycle_mult must be >= 1, got {cycle_mult}")
    if cycle_mult == 1.0:
        index = step // cycle_steps
        start, length = index * cycle_steps, cycle_steps
    else:
        # The loop runs O(log step) times, since cycles grow geometrically.
        index, start, length = 0, 0, cycle_steps
        while step >= start + length:
            start += length
            index += 1
            length = max(1, round(cycle_steps * cycle_mult**index))
    return CyclePosition(index, start, length, step == start + length - 1)


def cosine_restarts(
    step: int,
    cycle_steps: int,
    cycle_mult: float = 1.0,
    min_factor: float = 0.0,
    warmup_steps: int = 0,
) -> float:
    """SGDR (Loshchilov & Hutter 2017): cosine from 1 to ``min_factor`` in each cycle, then restart at 1.

    Cycles are laid out by ``cycle_index``.  The warmup multiplies the first
    ``warmup_steps`` by the linear ramp (step + 1) / warmup_steps instead of
    delaying the cycles, so cycle ends (snapshot points) stay where
    ``cycle_index`` puts them.
    """
    position = cycle_index(step, cycle_steps, cycle_mult)
    factor = _cosine((step - position.start) / position.length, min_factor)
    if step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "step": step_decay,
    "cosine": warmup_cosine,
    "sgdr": cosine_restarts,
}

_FORMS = (
    "constant",
    "step:EPOCHS[:GAMMA]",
    "cosine[:warmup=EPOCHS][:min=FACTOR]",
    "sgdr:EPOCHS[:mult=M][:warmup=EPOCHS][:min=FACTOR]",
)
_FORMS_HELP = "valid forms: " + ", ".join(_FORMS)
# Positional fields and key=value options each schedule kind accepts in a spec.
_POSITIONAL = {"constant": (), "step": ("period", "gamma"), "cosine": (), "sgdr": ("period",)}
_OPTIONS = {
    "constant": {},
    "step": {"gamma": "gamma"},
    "cosine": {"warmup": "warmup_epochs", "min": "min_factor"},
    "sgdr": {"mult": "cycle_mult", "warmup": "warmup_epochs", "min": "min_factor"},
}


def _format_number(value: float) -> str:
    """Shortest text that reads back as the same float: 10 rather than 10.0."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


@dataclass(frozen=True)
class Schedule:
    """A schedule from ``SCHEDULES`` with its settings in epochs.

    ``factor(step, steps_per_epoch, total_epochs)`` converts the epoch
    settings to steps (rounded to whole steps) and calls the pure function on
    the global step.  ``str(schedule)`` is a spec that ``parse_schedule`` reads back.

    Attributes:
        kind: a key of ``SCHEDULES``.
        period: epochs between LR decays (``step``) or of the first cycle (``sgdr``).
        gamma: decay per period of ``step``.
        warmup_epochs: linear warmup length (``cosine``, ``sgdr``).
        min_factor: final factor of a cosine (``cosine``, ``sgdr``).
        cycle_mult: growth of each SGDR cycle over the previous one.
    """

    kind: str = "constant"
    period: float | None = None
    gamma: float = 0.5
    warmup_epochs: float = 0.0
    min_factor: float = 0.0
    cycle_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; {_FORMS_HELP}")
        needs_period = "period" in _POSITIONAL[self.kind]
        if needs_period and (self.period is None or self.period <= 0):
            raise ValueError(f"schedule {self.kind!r} needs a period > 0 in epochs; {_FORMS_HELP}")
        used = set(_POSITIONAL[self.kind]) | set(_OPTIONS[self.kind].values())
        for field in fields(self):
            if field.name not in used | {"kind"} and getattr(self, field.name) != field.default:
                raise ValueError(f"{field.name} does not apply to schedule {self.kind!r}; {_FORMS_HELP}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup must be >= 0 epochs, got {self.warmup_epochs}")
        if self.cycle_mult < 1.0:
            raise ValueError(f"sgdr mult must be >= 1, got {self.cycle_mult}")

    def factor(self, step: int, steps_per_epoch: int, total_epochs: int) -> float:
        """LR factor at global ``step`` for a run of ``total_epochs`` of ``steps_per_epoch`` steps."""
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")

        def to_steps(epochs: float) -> int:
            return round(epochs * steps_per_epoch)

        if self.kind == "constant":
            return constant(step)
        if self.kind == "step":
            assert self.period is not None
            return step_decay(step, max(1, to_steps(self.period)), self.gamma)
        if self.kind == "cosine":
            total_steps = total_epochs * steps_per_epoch
            warmup_steps = min(to_steps(self.warmup_epochs), total_steps)
            return warmup_cosine(step, total_steps, warmup_steps, self.min_factor)
        assert self.period is not None
        return cosine_restarts(
            step, max(1, to_steps(self.period)), self.cycle_mult, self.min_factor, to_steps(self.warmup_epochs)
        )

    def cycle(self, step: int, steps_per_epoch: int) -> CyclePosition | None:
        """The SGDR cycle of ``step`` (see ``cycle_index``); None for other kinds."""
        if self.kind != "sgdr":
            return None
        assert self.period is not None
        return cycle_index(step, max(1, round(self.period * steps_per_epoch)), self.cycle_mult)

    def to_spec(self) -> str:
        """The canonical CLI spec; ``parse_schedule(s.to_spec()) == s``."""
        parts = [self.kind]
        if self.period is not None:
            parts.append(_format_number(self.period))
        defaults = {field.name: field.default for field in fields(self)}
        for key, name in _OPTIONS[self.kind].items():
            value = getattr(self, name)
            if value != defaults[name]:
                parts.append(f"{key}={_format_number(value)}")
        return ":".join(parts)

    def __str__(self) -> str:
        return self.to_spec()


def parse_schedule(spec: str) -> Schedule:
    """Read a CLI schedule spec; periods and warmups are in epochs.

    Forms: ``constant``, ``step:EPOCHS[:GAMMA]`` (``step:10`` halves the LR
    every 10 epochs), ``cosine[:warmup=EPOCHS][:min=FACTOR]``,
    ``sgdr:EPOCHS[:mult=M][:warmup=EPOCHS][:min=FACTOR]``.  Options may also be
    written as key=value for positional fields of step (``step:10:gamma=0.1``).
    """
    kind, *parts = spec.strip().split(":")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r} in {spec!r}; {_FORMS_HELP}")
    settings: dict[str, float] = {}
    positional = list(_POSITIONAL[kind])
    for text in parts:
        if "=" in text:
            key, _, value = text.partition("=")
            if key not in _OPTIONS[kind]:
                options = ", ".join(_OPTIONS[kind]) or "none"
                raise ValueError(f"unknown option {key!r} for {kind!r} in {spec!r} (options: {options}); {_FORMS_HELP}")
            name = _OPTIONS[kind][key]
        else:
            if not positional:
                raise ValueError(f"too many fields in {spec!r}; {_FORMS_HELP}")
            name, value = positional.pop(0), text
        if name in settings:
            raise ValueError(f"{name} given twice in {spec!r}")
        try:
            settings[name] = float(value)
        except ValueError:
            raise ValueError(f"{value!r} in {spec!r} is not a number; {_FORMS_HELP}") from None
    return Schedule(kind, **settings)
