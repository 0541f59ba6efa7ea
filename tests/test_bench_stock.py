"""The stock baseline (bench/stock.py): each piece of its fixed recipe, and a tiny run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from fixtures import load_bench_script
from herbarium.demo import make_demo_data

stock = load_bench_script("stock")


def test_recipe_is_the_plain_script_a_timm_user_writes():
    recipe = stock.StockRecipe()
    assert (recipe.batch_size, recipe.lr, recipe.weight_decay, recipe.warmup_fraction) == (64, 1e-3, 0.05, 0.05)
    assert (recipe.crop_scale, recipe.eval_resize, recipe.tau) == ((0.25, 1.0), 1.14, 1.0)


def test_transforms_crop_flip_in_training_and_centre_crop_in_evaluation_with_the_weights_normalisation():
    recipe = stock.StockRecipe(size=64)
    train = stock.train_transform(recipe).transforms
    assert isinstance(train[0], T.RandomResizedCrop) and train[0].scale == (0.25, 1.0) and train[0].size == (64, 64)
    assert isinstance(train[1], T.RandomHorizontalFlip)
    evaluate = stock.eval_transform(recipe).transforms
    assert isinstance(evaluate[0], T.Resize) and evaluate[0].size == int(64 * 1.14)
    assert isinstance(evaluate[1], T.CenterCrop) and evaluate[1].size == (64, 64)
    assert tuple(evaluate[-1].mean) == tuple(evaluate[-1].std) == (0.5, 0.5, 0.5)
    grey = stock.eval_transform(recipe)(Image.new("RGB", (100, 80), (255, 255, 255)))
    assert grey.shape == (3, 64, 64) and torch.allclose(grey, torch.ones_like(grey))  # (1 - 0.5) / 0.5


def test_warmup_then_cosine_to_zero():
    total, warmup = 100, 5
    assert stock.warmup_cosine_lr(0, total, warmup) == pytest.approx(1 / 5)
    assert stock.warmup_cosine_lr(4, total, warmup) == pytest.approx(1.0)
    assert stock.warmup_cosine_lr(5, total, warmup) == pytest.approx(1.0)
    middle = 5 + (total - warmup) // 2
    assert stock.warmup_cosine_lr(middle, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert stock.warmup_cosine_lr(total, total, warmup) == pytest.approx(0.0)


def test_logit_adjustment_adds_tau_log_prior_in_training_only():
    prior = stock.log_prior([0, 0, 0, 1], num_classes=3)  # class 2 has no image: counted as one
    assert torch.allclose(prior, torch.log(torch.tensor([3 / 5, 1 / 5, 1 / 5])))
    logits, labels = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    assert stock.training_loss(logits, labels, None) == pytest.approx(float(F.cross_entropy(logits, labels)))
    assert stock.training_loss(logits, labels, prior) == pytest.approx(float(F.cross_entropy(logits + prior, labels)))


def test_model_is_lite0_with_its_packaged_weights_and_a_fresh_classifier():
    model = stock.build_model(7)
    assert model.default_cfg["architecture"] == "tf_efficientnet_lite0"
    assert model.get_classifier().out_features == 7
    from herbarium.models.pretrained import load_efficientnet_lite_imagenet

    reference = load_efficientnet_lite_imagenet(0)
    assert torch.equal(model.conv_stem.weight, reference.conv_stem.weight)


def test_coarser_ranks_are_the_finest_prediction_mapped_up(tmp_path):
    data = tmp_path / "demo"
    make_demo_data(data, image_size=32, max_per_class=4, min_per_class=2, test_per_class=1, num_families=2,
                   genera_per_family=2, species_per_genus=2)
    result = stock.run_stock(str(data), "train", "test", stock.StockRecipe(size=32, epochs=1, workers=0), device="cpu")
    taxonomy, predictions = result["taxonomy"], result["predictions"]
    species = predictions["species"]
    assert len(species) == len(result["test"])
    for rank in ("genus", "family"):
        assert np.array_equal(predictions[rank], taxonomy.ancestor_map("species", rank).numpy()[species])
    assert result["top"]["species"].shape == (len(species), 5)
