"""Optimizers and LR schedules: pure schedule functions of an explicit step, and the phased Adam/SGD optimizer."""
from .phased import DEFAULT_LRS, DEFAULT_WEIGHT_DECAY, OPTIMIZERS, Phase, PhasedOptimizer, parse_phases
from .schedules import (
    SCHEDULES,
    CyclePosition,
    Schedule,
    constant,
    cosine_restarts,
    cycle_index,
    parse_schedule,
    step_decay,
    warmup_cosine,
)

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_WEIGHT_DECAY",
    "OPTIMIZERS",
    "SCHEDULES",
    "CyclePosition",
    "Phase",
    "PhasedOptimizer",
    "Schedule",
    "constant",
    "cosine_restarts",
    "cycle_index",
    "parse_phases",
    "parse_schedule",
    "step_decay",
    "warmup_cosine",
]
