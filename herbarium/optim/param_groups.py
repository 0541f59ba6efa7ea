"""Parameter groups: the pretrained trunk at a fraction of the heads' learning rate.

A pretrained trunk already holds good features while the heads start from
random weights; fine-tuning both at one learning rate lets the large early
updates of the heads' gradients wash out what the trunk knew, which costs most
on the rare classes. ``lr_scale`` is the per-group factor the phased
optimizer applies to every phase's learning rate (timm's convention).
"""
from __future__ import annotations

from typing import Any

from torch import nn


def parameter_groups(model: nn.Module, trunk_lr_scale: float = 1.0) -> list[Any]:
    """The trainable parameters; with ``trunk_lr_scale != 1``, two groups: the trunk's (scaled) and the rest."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if trunk_lr_scale == 1.0:
        return trainable
    if trunk_lr_scale <= 0:
        raise ValueError(f"the trunk's learning-rate scale must be > 0, got {trunk_lr_scale}")
    trunk_ids = {id(parameter) for parameter in model.trunk.parameters()}
    trunk = [parameter for parameter in trainable if id(parameter) in trunk_ids]
    heads = [parameter for parameter in trainable if id(parameter) not in trunk_ids]
    groups = [{"params": trunk, "lr_scale": float(trunk_lr_scale)}, {"params": heads}]
    return [group for group in groups if group["params"]]
