"""Global pooling: feature maps [B, C, H, W] -> pooled features [B, C].

Pooling is done here rather than inside the trunk so that every trunk accepts
any input size (training at 224 px and testing at 448 px, say) and so that the
pooling can be chosen per experiment.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: [B, C, H, W] -> [B, C]."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(-2, -1))


class GlobalMaxPool(nn.Module):
    """Maximum over the spatial dimensions: [B, C, H, W] -> [B, C]."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.amax(dim=(-2, -1))


class GeM(nn.Module):
    """Generalized-mean pooling (Radenović, Tolias & Chum, 2018).

    ``(mean(x ** p)) ** (1 / p)`` over the spatial dimensions: p = 1 is average
    pooling and p -> infinity tends to max pooling, so a learnable p lets the
    network choose how much to favour the few locations where a small
    discriminative part (a flower, a leaf margin) shows up. It was used by the
    1st place of the Google Landmark (Lotte) competition and by the Herbarium
    2022 winner.

    Args:
        p: initial exponent.
        eps: floor applied before the power; the power of a negative number
            is undefined, and post-ReLU maps are non-negative anyway.
        learnable: learn p (a parameter) or keep it fixed (a buffer).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        p_tensor = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = eps

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        # The power is taken in float32: x ** 3 of bf16 activations loses most
        # of its mantissa and the mean of such values drifts.
        p = self.p.float()
        powered = maps.float().clamp(min=self.eps).pow(p)  # [B, C, H, W]
        pooled = powered.mean(dim=(-2, -1)).pow(1.0 / p)  # [B, C]
        return pooled.to(maps.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}, learnable={isinstance(self.p, nn.Parameter)}"


POOLS: dict[str, type[nn.Module]] = {
    "avg": GlobalAvgPool,
    "max": GlobalMaxPool,
    "gem": GeM,
}


def build_pool(name: str) -> nn.Module:
    """Return the global pooling module called ``name`` (one of ``POOLS``)."""
    if name not in POOLS:
        raise ValueError(f"unknown pool {name!r}; valid choices: {', '.join(POOLS)}")
    return POOLS[name]()
