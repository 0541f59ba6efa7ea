"""ArcFace heads: scaled cosines, the angular margin, sub-centres, and targets reaching the heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from herbarium.models import ArcFaceHead, LinearHead, ModelConfig, build_model

TINY = "resnet10t"


def scaled_cosine(features: torch.Tensor, centres: torch.Tensor, scale: float) -> torch.Tensor:
    centres = centres.detach()
    return scale * F.normalize(features, dim=1) @ F.normalize(centres, dim=1).t()


def test_margin_zero_with_targets_is_scale_times_cosine():
    torch.manual_seed(0)
    head = ArcFaceHead(8, 5, margin=0.0, scale=30.0)
    features, target = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    expected = scaled_cosine(features, head.weight, 30.0)
    assert torch.allclose(head(features, target), expected, atol=1e-5)
    assert torch.allclose(head(features), expected, atol=1e-5)


def test_margin_moves_only_the_target_logit_to_cos_theta_plus_m():
    torch.manual_seed(1)
    margin, scale = 0.3, 16.0
    head = ArcFaceHead(8, 5, margin=margin, scale=scale)
    features, target = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, -1])  # the last one is unlabelled
    cosine = scaled_cosine(features, head.weight, 1.0)
    logits = head(features, target).detach()
    for row in range(5):
        theta = math.acos(float(cosine[row, target[row]]))
        assert theta + margin < math.pi  # the plain cos(theta + m) branch
        assert float(logits[row, target[row]]) == pytest.approx(scale * math.cos(theta + margin), abs=1e-4)
        others = [c for c in range(5) if c != target[row]]
        assert torch.allclose(logits[row, others], scale * cosine[row, others], atol=1e-5)
    assert torch.allclose(logits[5], scale * cosine[5], atol=1e-5)  # no label, no margin
    # evaluation: no targets, no margin
    assert torch.allclose(head(features).detach(), scale * cosine, atol=1e-5)


def test_target_logit_keeps_falling_past_pi_minus_margin():
    head = ArcFaceHead(2, 2, margin=0.5, scale=1.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    angles = torch.linspace(0.0, math.pi, 50)
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    target_logits = head(features, torch.zeros(50, dtype=torch.long))[:, 0]
    assert bool((target_logits[1:] < target_logits[:-1]).all())


def test_one_subcenter_equals_plain_arcface_and_k_takes_the_nearest_centre():
    torch.manual_seed(2)
    plain = ArcFaceHead(8, 4, margin=0.3, scale=30.0)
    one = ArcFaceHead(8, 4, margin=0.3, scale=30.0, subcenters=1)
    three = ArcFaceHead(8, 4, margin=0.3, scale=30.0, subcenters=3)
    features, target = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        one.weight.copy_(plain.weight)
        # three centres per class: the plain centre and two far away ones (rows c*3 .. c*3+2)
        three.weight.copy_(torch.randn(12, 8))
        three.weight[0::3] = plain.weight
    assert torch.equal(one(features, target), plain(features, target))
    by_centre = scaled_cosine(features, three.weight, 1.0).view(5, 4, 3)
    assert torch.allclose(three.cosine(features), by_centre.amax(dim=2), atol=1e-6)
    assert not torch.allclose(three(features, target), plain(features, target), atol=1e-3)
    # three copies of each plain centre: the nearest centre is the plain one, so k = 3 gives plain ArcFace
    with torch.no_grad():
        three.weight.copy_(plain.weight.repeat_interleave(3, dim=0))
    assert torch.allclose(three(features, target), plain(features, target), atol=1e-5)


def test_arcface_levels_give_those_ranks_arcface_and_targets_reach_them():
    torch.manual_seed(0)
    cfg = ModelConfig(pretrained=False, trunk=TINY, embedding_dim=16, dropout=0.0, arcface_levels=("species",), arcface_margin=0.5, arcface_scale=10.0)
    model = build_model(cfg, {"genus": 3, "species": 5}).eval()
    assert isinstance(model.heads["species"], ArcFaceHead) and isinstance(model.heads["genus"], LinearHead)
    assert model.heads["species"].margin == 0.5 and model.heads["species"].scale == 10.0
    images, targets = torch.randn(4, 3, 32, 32), {"genus": torch.tensor([0, 1, 2, 0]), "species": torch.tensor([0, 1, 2, 3])}
    with torch.no_grad():
        evaluation, training = model(images), model(images, targets)
    assert torch.equal(evaluation["genus"], training["genus"])
    rows = torch.arange(4)
    assert bool((training["species"][rows, targets["species"]] < evaluation["species"][rows, targets["species"]]).all())
    assert float(evaluation["species"].abs().max()) <= 10.0 + 1e-4  # scaled cosines


def test_head_arcface_and_bad_settings_fail_clearly():
    model = build_model(ModelConfig(pretrained=False, trunk=TINY, head="arcface", arcface_subcenters=2), {"genus": 3, "species": 5})
    assert all(isinstance(head, ArcFaceHead) and head.subcenters == 2 for head in model.heads.values())
    with pytest.raises(ValueError, match="no head"):
        build_model(ModelConfig(pretrained=False, trunk=TINY, arcface_levels=("family",)), {"genus": 3, "species": 5})
    with pytest.raises(ValueError, match="margin"):
        ModelConfig(arcface_margin=2.0)
    with pytest.raises(ValueError, match="subcenters"):
        ModelConfig(arcface_subcenters=0)
    with pytest.raises(ValueError, match="linear, arcface"):
        ModelConfig(head="cosine")


def test_config_with_arcface_round_trips_through_json():
    import json

    cfg = ModelConfig(pretrained=False, trunk=TINY, pool="gem", embedding_dim=32, arcface_levels=("species",), arcface_subcenters=3)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
