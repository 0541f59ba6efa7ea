"""timm's pretrained weights the way timm gets them, without waiting on a network that is not there.

timm fetches a model's default weights from the Hugging Face hub into the
hub's cache (``HF_HOME``/``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` forbids the
network). Offline, the hub client retries a connection for over a minute
before failing, so herbarium looks first:

1. the weights file in the hub's cache (``try_to_load_from_cache``): timm
   loads it from there, no network touched;
2. else, when ``HF_HUB_OFFLINE`` is not set and the hub answers a
   connection within :data:`PROBE_SECONDS`: timm downloads it into the cache;
3. else, at once, one line saying what to download, where to put it in the
   cache, or ``--weights FILE``, or ``--no-pretrained``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
from huggingface_hub import constants, try_to_load_from_cache
from timm.models import get_pretrained_cfg

PROBE_SECONDS = 3.0  # a reachable hub answers a TCP connection far faster than this


class PretrainedWeightsError(ValueError):
    """Pretrained trunk weights were asked for and cannot be had; the message says what to do."""


@dataclass(frozen=True)
class HubWeights:
    """Where timm's default weights of one architecture live on the hub and in its cache."""

    architecture: str
    repo_id: str  # timm/resnet50.a1_in1k
    filename: str  # model.safetensors

    @property
    def url(self) -> str:
        return f"{constants.ENDPOINT}/{self.repo_id}/resolve/main/{self.filename}"

    @property
    def cache_folder(self) -> Path:
        """The folder of the hub's cache where a file put by hand is found (``snapshots/main``, no refs needed)."""
        return Path(constants.HF_HUB_CACHE) / f"models--{self.repo_id.replace('/', '--')}" / "snapshots" / "main"

    def cached(self) -> Path | None:
        """The weights file in the hub's cache, or None."""
        found = try_to_load_from_cache(self.repo_id, self.filename, cache_dir=constants.HF_HUB_CACHE)
        return Path(found) if isinstance(found, str) else None


def hub_weights(architecture: str) -> HubWeights | None:
    """The hub location of timm's default weights of ``architecture``; None if timm has none on the hub."""
    cfg = get_pretrained_cfg(architecture)
    if cfg is None or not cfg.hf_hub_id:
        return None
    return HubWeights(architecture, cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors")


def offline_reason() -> str | None:
    """Why the hub cannot be asked now (``HF_HUB_OFFLINE=1``, or no answer from its host), or None when it can."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as error:
        return f"{host}:{port} cannot be reached ({error.strerror or type(error).__name__})"
    return None


def missing_message(weights: HubWeights, reason: str) -> str:
    """One line: the weights are neither cached nor downloadable, and the three ways on."""
    return (f"pretrained weights: the ImageNet weights of {weights.architecture!r} are not in timm's cache and "
            f"cannot be downloaded ({reason}). Download {weights.url} into {weights.cache_folder}/ (or run "
            f"'hf download {weights.repo_id} {weights.filename}' where there is network and copy the cache), pass "
            f"a file with --weights FILE, or train from random weights with --no-pretrained")


def create_pretrained(architecture: str, **kwargs) -> "timm.models.nn.Module":
    """``timm.create_model(architecture, pretrained=True, **kwargs)`` from the cache, or a download when online.

    Raises :class:`PretrainedWeightsError` at once, with what to do, when
    the weights can be had neither way.
    """
    weights = hub_weights(architecture)
    if weights is None:
        return _timm_own(architecture, kwargs)
    cached = weights.cached()
    if cached is not None:  # timm reads a pretrained_cfg "file" before any hub or URL source
        return timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs)
    reason = offline_reason()
    if reason is not None:
        raise PretrainedWeightsError(missing_message(weights, reason))
    try:
        return timm.create_model(architecture, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:  # the connection dropped, a corrupt download
        raise PretrainedWeightsError(missing_message(weights, _short(error))) from error


def _timm_own(architecture: str, kwargs: dict) -> "timm.models.nn.Module":
    """Weights timm keeps at a plain URL (torch hub cache) rather than on the hub, or none at all."""
    cfg = get_pretrained_cfg(architecture)
    source = (cfg.url or cfg.file) if cfg is not None else ""
    if not source:
        raise PretrainedWeightsError(
            f"pretrained weights: timm has none for {architecture!r}; train from random weights with --no-pretrained "
            "or pass a local state dict with --weights FILE")
    try:
        return timm.create_model(architecture, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        raise PretrainedWeightsError(
            f"pretrained weights: the ImageNet weights of {architecture!r} are not in torch's hub cache and cannot be "
            f"downloaded ({_short(error)}). Download {source}, pass it with --weights FILE, or train from random "
            "weights with --no-pretrained") from error


def _short(error: Exception, limit: int = 160) -> str:
    reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return reason if len(reason) <= limit else reason[:limit - 1] + "…"
