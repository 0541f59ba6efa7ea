"""Parameter groups: the pretrained trunk learns slower than the new heads.

A pretrained trunk already holds good features while the heads start from
random weights; fine-tuning both at one learning rate lets the large early
updates of the heads' gradients wash out what the trunk knew, which costs most
on the rare classes. Two ways to slow the trunk down, which compose:

- a trunk scale: every trunk parameter at a fraction of the heads' rate;
- layer-wise decay (BEiT, timm's ``--layer-decay``): the trunk's last layer at
  the heads' rate and each earlier layer ``decay`` times slower, so generic
  early filters move least. The layers are timm's own grouping of the model
  (``group_matcher``), through :func:`timm.optim.param_groups_layer_decay`.

``lr_scale`` is the per-group factor the phased optimizer applies to every
phase's learning rate (timm's convention). Weight decay stays each phase's own:
these groups only change learning rates.
"""
from __future__ import annotations

from typing import Any

from timm.optim import param_groups_layer_decay
from torch import nn

from ..errors import UsageError


def parameter_groups(model: nn.Module, trunk_lr_scale: float = 1.0, layer_decay: float | None = None) -> list[Any]:
    """The trainable parameters; when the trunk learns at its own rates, groups with an ``lr_scale`` each.

    Without ``layer_decay``: the trunk's group (at ``trunk_lr_scale``) and the heads'. With it: one
    group per trunk layer at ``trunk_lr_scale * layer_decay ** (layers after it)``, and the heads'.
    """
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if trunk_lr_scale <= 0:
        raise ValueError(f"the trunk's learning-rate scale must be > 0, got {trunk_lr_scale}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"the layer-wise learning-rate decay must be in (0, 1], got {layer_decay}")
    if trunk_lr_scale == 1.0 and layer_decay is None:
        return trainable
    trunk_ids = {id(parameter) for parameter in model.trunk.parameters()}
    heads = [parameter for parameter in trainable if id(parameter) not in trunk_ids]
    groups = [*_trunk_groups(model.trunk, trunk_lr_scale, layer_decay), {"params": heads}]
    return [group for group in groups if group["params"]]


def _trunk_groups(trunk: nn.Module, trunk_lr_scale: float, layer_decay: float | None) -> list[dict[str, Any]]:
    """The trunk's trainable parameters by learning-rate scale, largest first (the pooling at the top rate)."""
    trainable = [parameter for parameter in trunk.parameters() if parameter.requires_grad]
    if layer_decay is None:
        return [{"params": trainable, "lr_scale": float(trunk_lr_scale)}]
    backbone = getattr(trunk, "model", trunk)
    if not hasattr(backbone, "group_matcher"):
        raise UsageError(f"--layer-decay needs a trunk that timm can split into layers (a timm model's group_matcher); "
                         f"{type(backbone).__name__} has none: use --trunk-lr-scale instead")
    by_scale: dict[float, list[nn.Parameter]] = {1.0: []}
    for group in param_groups_layer_decay(backbone, weight_decay=0.0, layer_decay=layer_decay):
        by_scale.setdefault(group["lr_scale"], []).extend(group["params"])
    grouped = {id(parameter) for params in by_scale.values() for parameter in params}
    by_scale[1.0] += [parameter for parameter in trainable if id(parameter) not in grouped]
    return [{"params": params, "lr_scale": float(trunk_lr_scale * scale)}
            for scale, params in sorted(by_scale.items(), reverse=True)]
