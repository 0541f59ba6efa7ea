"""Mixup/CutMix targets per rank, soft-target losses, the trunk's learning rates (scale, layer decay) and the weight EMA."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import tiny_train_config

from herbarium import engine
from herbarium.checkpoint import load_checkpoint
from herbarium.config import DataConfig, OptimConfig
from herbarium.data.mixing import RankMixup
from herbarium.demo import make_demo_data
from herbarium.errors import UsageError
from herbarium.export import export, load_safetensors
from herbarium.losses import FocalLoss, LogitAdjustedLoss
from herbarium.models import MultiRankModel, build_model
from herbarium.models.config import ModelConfig
from herbarium.optim import PhasedOptimizer, parse_phases, parse_schedule
from herbarium.optim.param_groups import parameter_groups
from herbarium.run_dir import model_from_checkpoint
from herbarium.taxonomy import Taxonomy

CLASSES = {"family": 3, "genus": 5, "species": 7}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, seed=0, image_size=32, max_per_class=12, min_per_class=2, test_per_class=2)
    return out


# ------------------------------------------------------------------ mixing
def _targets(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.stack([torch.randint(0, n, (batch,), generator=generator) for n in CLASSES.values()], dim=1)


@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0)])
def test_mixup_gives_every_rank_the_same_pairs_and_mix(alphas):
    np.random.seed(0)
    images, targets = torch.rand(8, 3, 16, 16), _targets(8)
    mixed_images, soft = RankMixup(CLASSES, *alphas)(images, targets)
    assert list(soft) == list(CLASSES) and mixed_images.shape == images.shape
    lams = []
    for column, (rank, classes) in enumerate(CLASSES.items()):
        assert soft[rank].shape == (8, classes)
        assert torch.allclose(soft[rank].sum(dim=1), torch.ones(8))
        own, partner = F.one_hot(targets[:, column], classes).float(), F.one_hot(targets.flip(0)[:, column], classes).float()
        # soft = lam * own + (1 - lam) * partner (timm pairs the batch with its reverse): solve for lam on one sample
        same = (own == partner).all(dim=1)
        sample = int((~same).nonzero()[0])
        lam = float(soft[rank][sample] @ own[sample])
        assert torch.allclose(soft[rank], lam * own + (1 - lam) * partner, atol=1e-6)
        lams.append(lam)
    assert max(lams) - min(lams) < 1e-6 and 0.0 < lams[0] < 1.0


def test_mixup_leaves_an_unlabelled_rank_at_zero_and_an_odd_last_image_alone():
    np.random.seed(1)
    targets = _targets(5)
    targets[:, 1] = -1  # no genus label in this batch
    images = torch.rand(5, 3, 8, 8)
    mixed_images, soft = RankMixup(CLASSES, 0.4)(images, targets)
    assert torch.count_nonzero(soft["genus"]) == 0
    assert torch.equal(mixed_images[4], images[4])
    assert torch.equal(soft["species"][4], F.one_hot(targets[4, 2], 7).float())


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_hot_probability_targets_give_the_index_loss(gamma, weighted):
    logits, target = torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 3, 1, -1, 2, 2])
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0]) if weighted else None
    soft = F.one_hot(target.clamp(min=0), 4).float() * (target >= 0).unsqueeze(1)
    for loss in (FocalLoss(gamma=gamma, weight=weight), LogitAdjustedLoss([5, 1, 2, 9], gamma=gamma, weight=weight)):
        assert torch.allclose(loss(logits, soft), loss(logits, target), atol=1e-6)


def test_mixed_targets_give_the_mixture_of_the_two_cross_entropies():
    logits = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.25, 0.75]])
    expected = -(soft * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, soft), expected)


def test_mixup_with_a_loss_that_cannot_take_mixed_targets_is_refused(demo, tmp_path):
    cfg = tiny_train_config(demo, tmp_path / "run", epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mixup=0.2),
                              loss=dataclasses.replace(cfg.loss, loss="sce"))
    with pytest.raises(UsageError, match="sce"):
        engine.Trainer(cfg)


# ------------------------------------------------------------ trunk lr
def test_trunk_learning_rate_is_the_scaled_heads_rate(demo, tmp_path):
    model = engine.Trainer(tiny_train_config(demo, tmp_path / "run", epochs=1)).model
    groups = parameter_groups(model, 0.1)
    trunk_ids = {id(p) for p in model.trunk.parameters()}
    assert {id(p) for p in groups[0]["params"]} == trunk_ids and groups[0]["lr_scale"] == 0.1
    assert not trunk_ids & {id(p) for p in groups[1]["params"]}
    optimizer = PhasedOptimizer(groups, parse_phases("adamw@1e-3:0"), parse_schedule("constant"), 10, 2)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    assert parameter_groups(model, 1.0) == [p for p in model.parameters() if p.requires_grad]


def test_layer_decay_slows_each_earlier_trunk_layer_and_composes_with_the_trunk_scale(demo, tmp_path):
    model = engine.Trainer(tiny_train_config(demo, tmp_path / "run", epochs=1)).model
    groups = parameter_groups(model, 0.5, layer_decay=0.8)
    trunk_ids = {id(p) for p in model.trunk.parameters()}
    assert not trunk_ids & {id(p) for p in groups[-1]["params"]} and "lr_scale" not in groups[-1]  # the heads
    scales = [group["lr_scale"] for group in groups[:-1]]
    assert scales == sorted(scales, reverse=True) and len(scales) >= 4
    assert scales == pytest.approx([0.5 * 0.8 ** k for k in range(len(scales))])
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    stem = next(iter(model.trunk.model.parameters()))
    assert any(p is stem for p in groups[-2]["params"])  # the stem learns slowest
    optimizer = PhasedOptimizer(groups, parse_phases("adamw@1e-3:0"), parse_schedule("constant"), 10, 2)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-3 * s for s in scales] + [1e-3])
    assert all(group["weight_decay"] == 0.05 for group in optimizer.param_groups)  # the phase's own decay


def _straight_and_paused(demo: Path, tmp_path: Path, **changes) -> tuple[dict, dict]:
    """The last checkpoints of a run trained straight through and of the same run stopped after epoch 1 and resumed."""
    engine.train(tiny_train_config(demo, tmp_path / "straight", **changes))
    engine.train(tiny_train_config(demo, tmp_path / "paused", stop_after_epoch=1, **changes))
    engine.train(tiny_train_config(demo, tmp_path / "paused", **changes), resume=tmp_path / "paused")
    return tuple(load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "paused"))


def test_layer_decay_trains_and_resumes_exactly(demo, tmp_path):
    straight, paused = _straight_and_paused(
        demo, tmp_path, optim=OptimConfig(optim="adamw@2e-3:0", schedule="cosine", layer_decay=0.7))
    assert all(torch.equal(straight["model"][k], paused["model"][k]) for k in straight["model"])
    scales = [group.get("lr_scale", 1.0) for group in straight["optimizer"]["optimizers"]["adamw"]["param_groups"]]
    assert len(set(scales)) >= 4 and min(scales) < 0.7 ** 3  # trained with the layer-wise rates


def test_layer_decay_needs_a_trunk_timm_can_split(tmp_path):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(3, 3)
            self.head = torch.nn.Linear(3, 2)

    with pytest.raises(UsageError, match="--layer-decay.*Linear"):
        parameter_groups(Plain(), layer_decay=0.8)


# ------------------------------------------------------------------- EMA
def test_ema_is_checkpointed_resumed_exactly_and_evaluated(demo, tmp_path):
    straight, paused = _straight_and_paused(
        demo, tmp_path, optim=OptimConfig(optim="adam@2e-3:0", schedule="cosine", ema_decay=0.99))
    for key in ("model", "ema"):
        assert straight[key].keys() == paused[key].keys()
        assert all(torch.equal(straight[key][k], paused[key][k]) for k in straight[key]), key
    assert any(not torch.equal(straight["ema"][k], straight["model"][k]) for k in straight["model"])
    model, _ = model_from_checkpoint(straight)
    assert all(torch.equal(value, straight["ema"][name]) for name, value in model.state_dict().items())


def test_mixup_and_cutmix_train_end_to_end(demo, tmp_path):
    cfg = tiny_train_config(demo, tmp_path / "run", epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mixup=0.2, cutmix=1.0))
    record = engine.train(cfg)
    assert np.isfinite(record["loss"])


# ------------------------------------------------------------ tree logits
def _tree_model(seed: int = 0) -> MultiRankModel:
    """A linear trunk with tree logits over family (3) <- genus (5) <- species (7)."""
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8))
    parents = {"genus": ("family", torch.tensor([0, 0, 1, 2, 2])), "species": ("genus", torch.tensor([0, 1, 1, 2, 3, 4, 4]))}
    return MultiRankModel(trunk, 8, CLASSES, ModelConfig(trunk="resnet10t", tree_logits=True), parents).eval()


def test_tree_logits_add_each_parents_composed_logits():
    model, images = _tree_model(), torch.rand(4, 3, 4, 4)
    features = model.forward_features(images)
    own = {rank: head(features) for rank, head in model.heads.items()}
    genus_of, family_of = torch.tensor([0, 1, 1, 2, 3, 4, 4]), torch.tensor([0, 0, 1, 2, 2])
    logits = model(images)
    assert list(logits) == list(CLASSES)
    assert torch.allclose(logits["family"], own["family"])
    assert torch.allclose(logits["genus"], own["genus"] + own["family"][:, family_of])
    assert torch.allclose(logits["species"], own["species"] + own["genus"][:, genus_of] + own["family"][:, family_of[genus_of]])


def test_tree_logits_need_a_parent_map_of_the_right_size():
    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8))
    with pytest.raises(ValueError, match="'species' to 'genus'.*7 classes one of 5 parents"):
        MultiRankModel(trunk, 8, CLASSES, ModelConfig(trunk="resnet10t"), {"species": ("genus", torch.tensor([0, 5, 1, 1, 1, 1, 1]))})
    with pytest.raises(ValueError, match="tree logits need each rank's parent map"):
        build_model(ModelConfig(pretrained=False, trunk="resnet10t", tree_logits=True), {"species": 7})


def test_tree_logits_train_resume_exactly_and_reload_with_their_tree(demo, tmp_path):
    straight, paused = _straight_and_paused(demo, tmp_path, model=ModelConfig(pretrained=False, trunk="resnet10t",
                                                                              tree_logits=True))
    assert all(torch.equal(straight["model"][k], paused["model"][k]) for k in straight["model"])
    taxonomy = Taxonomy.from_dict(json.loads((tmp_path / "straight" / "taxonomy.json").read_text()))
    assert torch.equal(straight["model"]["tree.species.genus"], taxonomy.parents("species"))
    assert torch.equal(straight["model"]["tree.genus.family"], taxonomy.parents("genus"))
    model, _ = model_from_checkpoint(straight)
    assert len(model.tree) == 2 and all(torch.equal(v, straight["model"][k]) for k, v in model.state_dict().items())


def test_tree_logits_survive_every_export(demo, tmp_path):
    engine.train(tiny_train_config(demo, tmp_path / "run", epochs=1,
                                   model=ModelConfig(pretrained=False, trunk="resnet10t", tree_logits=True)))
    written = export(tmp_path / "run", ["safetensors", "torchscript", "export"], tmp_path / "export")
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(images)
        outputs = [load_safetensors(tmp_path / "export")[0](images), torch.jit.load(str(written["torchscript"]))(images),
                   torch.export.load(str(written["export"])).module()(images)]
    for output in outputs:
        for rank in expected:
            torch.testing.assert_close(output[rank], expected[rank], rtol=1e-4, atol=1e-5)


def test_tree_logits_on_one_level_are_refused_naming_the_options(demo, tmp_path):
    cfg = tiny_train_config(demo, tmp_path / "run", model=ModelConfig(pretrained=False, trunk="resnet10t", tree_logits=True))
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, levels=("species",)))
    with pytest.raises(UsageError, match="--tree-logits.*--levels species has no parent rank"):
        engine.train(cfg)
