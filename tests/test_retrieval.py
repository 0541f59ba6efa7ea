"""Retrieval: centroids and kNN votes on constructed embeddings, mixing, and tta_eval's retrieval variant."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from herbarium import engine
from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from herbarium.data.dataset import ImageDataset
from herbarium.data.readers import read_split
from herbarium.data.transforms import eval_transform
from herbarium.demo import make_demo_data
from herbarium.evaluation.runner import evaluate, load_run
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.models.config import ModelConfig
from herbarium.retrieval import (
    Gallery,
    class_centroids,
    centroid_similarity,
    embed,
    knn_similarity,
    mix_log_probs,
    retrieval_log_probs,
)


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_centroids_are_normalised_class_means_and_queries_go_to_the_nearest():
    gallery = unit([1, 0.1, 0], [1, -0.1, 0], [0, 1, 0.2], [0, 1, -0.2], [0, 0, 1])
    labels = torch.tensor([0, 0, 1, 1, -1])  # the last image is unlabelled at this rank
    centroids, present = class_centroids(gallery, labels, num_classes=3)
    assert torch.allclose(centroids[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(centroids[1], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert present.tolist() == [True, True, False]
    queries = unit([0.9, 0.2, 0.1], [0.1, 0.8, 0.3], [0.1, 0.3, 0.9])
    similarity = centroid_similarity(queries, centroids, present)
    assert similarity.argmax(dim=1).tolist() == [0, 1, 1]  # class 2 has no images: never chosen
    assert torch.allclose(similarity[:, :2], queries @ centroids[:2].t())
    assert similarity[:, 2].tolist() == [-1.0, -1.0, -1.0]


def test_knn_votes_sum_the_neighbours_similarities_per_class():
    gallery = unit([1, 0], [0.8, 0.6], [0, 1], [-1, 0])
    labels = torch.tensor([0, 1, 1, 2])
    query = unit([1, 0])
    votes = knn_similarity(query, gallery, labels, num_classes=3, k=2)  # neighbours: image 0 (1.0), image 1 (0.8)
    assert torch.allclose(votes, torch.tensor([[1.0 / 2, 0.8 / 2, 0.0]]))
    votes = knn_similarity(query, gallery, labels, num_classes=3, k=3)  # + image 2 (0.0)
    assert torch.allclose(votes, torch.tensor([[1.0 / 3, 0.8 / 3, 0.0]]))


def test_several_models_average_their_similarities_and_mixing_weights_the_log_probs():
    first = Gallery(unit([1, 0], [0, 1]), {"species": torch.tensor([0, 1])}, {"species": 2})
    second = Gallery(unit([0, 1, 0], [1, 0, 0]), {"species": torch.tensor([0, 1])}, {"species": 2})
    queries = [unit([1, 0]), unit([1, 0, 0])]  # model 1 says class 0 (cos 1), model 2 says class 1 (cos 1)
    scores = retrieval_log_probs([first, second], queries, "centroid", k=1, scale=10.0)["species"]
    assert torch.allclose(scores, torch.log_softmax(torch.tensor([[5.0, 5.0]]), dim=1))
    heads = {"species": torch.log_softmax(torch.tensor([[2.0, 0.0]]), dim=1)}
    retrieval = {"species": torch.log_softmax(torch.tensor([[0.0, 4.0]]), dim=1)}
    assert torch.allclose(mix_log_probs(heads, retrieval, 0.0)["species"], heads["species"])
    assert torch.allclose(mix_log_probs(heads, retrieval, 1.0)["species"], retrieval["species"])
    half = mix_log_probs(heads, retrieval, 0.5)["species"]
    assert torch.allclose(half, torch.log_softmax(0.5 * heads["species"] + 0.5 * retrieval["species"], dim=1))
    with pytest.raises(ValueError, match="knn"):
        first.similarities(queries[0], mode="cosine")


# ----------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run directory with a freshly initialised ArcFace model (retrieval does not need a trained one)."""
    root = tmp_path_factory.mktemp("retrieval")
    data = root / "demo"
    make_demo_data(data, seed=2, image_size=32, max_per_class=6, min_per_class=2, test_per_class=2)
    cfg = TrainConfig(
        out=str(root / "run"), epochs=1, seed=0, device="cpu",
        data=DataConfig(data=str(data), val_split="test", size=32, batch_size=16, workers=0),
        model=ModelConfig(pretrained=False, trunk="resnet10t", dropout=0.0, embedding_dim=16, arcface_levels=("species",)),
        loss=LossConfig(levels=("genus", "species")),
        optim=OptimConfig(optim="adam@1e-3:0", schedule="constant"),
    )
    trainer = engine.Trainer(cfg)
    trainer.write_run_files()
    trainer.save("last")
    return data, Path(cfg.out)


def test_retrieval_alone_predicts_the_nearest_train_centroid(untrained_run, tmp_path):
    data, run = untrained_run
    settings = EvaluationSettings(views=("plain",), workers=0, device="cpu", batch_size=8, retrieval_gallery="train",
                                  retrieval_weight=1.0, primary="retrieval_consistent")
    result = evaluate([run], data, "test", out=tmp_path, settings=settings)
    assert result["metrics"]["primary"] == "retrieval_consistent"
    assert {"retrieval_heads", "retrieval_consistent", "tta_heads"} <= set(result["metrics"]["variants"])
    # the same by hand: flip-TTA unit embeddings of train, class centroids, nearest to each test embedding
    loaded = load_run(run, torch.device("cpu"))
    transform = eval_transform(32, loaded.profile.mean, loaded.profile.std)
    train = ImageDataset(read_split(data, "train", taxonomy=loaded.taxonomy), ("species",), transform)
    test = ImageDataset(read_split(data, "test", taxonomy=loaded.taxonomy), ("species",), transform)
    with torch.no_grad():
        train_images = torch.stack([train[i]["image"] for i in range(len(train))])
        gallery = embed(loaded.model, torch.stack([train_images, train_images.flip(-1)], dim=1))
        queries = embed(loaded.model, torch.stack([test[i]["image"] for i in range(len(test))])[:, None])
    centroids, present = class_centroids(gallery, train.targets[:, 0], loaded.taxonomy.num_classes("species"))
    expected = centroid_similarity(queries, centroids, present).argmax(dim=1)
    variants = json.loads((tmp_path / "metrics.json").read_text())["variants"]
    assert variants["retrieval_heads"]["species"]["top1"] == pytest.approx(float((expected == test.targets[:, 0]).float().mean()))
    assert variants["retrieval_heads"]["genus"] == variants["tta_heads"]["genus"]  # by default only the finest rank
    assert len(list(csv.reader((tmp_path / "submission.csv").open()))) == len(test) + 1


def test_retrieval_weight_zero_equals_the_heads(untrained_run, tmp_path):
    data, run = untrained_run
    settings = EvaluationSettings(views=("plain",), workers=0, device="cpu", batch_size=8, retrieval_gallery="train",
                                  retrieval_mode="knn", retrieval_k=3, retrieval_weight=0.0, retrieval_levels=("genus", "species"))
    variants = evaluate([run], data, "test", out=tmp_path, settings=settings)["metrics"]["variants"]
    for rank in ("genus", "species"):
        assert variants["retrieval_heads"][rank]["top1"] == variants["tta_heads"][rank]["top1"]
        assert variants["retrieval_heads"][rank]["macro_f1"] == variants["tta_heads"][rank]["macro_f1"]


def test_retrieval_levels_without_a_head_fail_clearly(untrained_run, tmp_path):
    data, run = untrained_run
    settings = EvaluationSettings(views=("plain",), workers=0, device="cpu", retrieval_gallery="train", retrieval_levels=("family",))
    with pytest.raises(ValueError, match="no head"):
        evaluate([run], data, "test", out=tmp_path, settings=settings)


def test_bad_retrieval_settings_fail_clearly():
    with pytest.raises(ValueError, match="centroid"):
        EvaluationSettings(retrieval_mode="cosine")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        EvaluationSettings(retrieval_weight=1.5)
