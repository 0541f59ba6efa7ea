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
from herbarium.evaluation.runner import build_gallery, evaluate, load_run
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.models.config import ModelConfig
from herbarium.retrieval import (
    Gallery,
    class_centroids,
    centroid_similarity,
    embed,
    gallery_placement,
    knn_similarity,
    mix_log_probs,
    nearest,
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


# ------------------------------------------------------------------ galleries at scale
def test_gallery_placement_prefers_float32_on_the_device_then_float16_then_the_host():
    gib = 2**30
    cuda = torch.device("cuda")
    # 1M x 1024 embeddings: 4.3 GB in float32, 2.1 GB in float16; a quarter of the free memory may hold them
    roomy = gallery_placement(2**20, 1024, cuda, free={"cuda": 40 * gib, "cpu": 40 * gib})
    assert (roomy.device, roomy.dtype) == (cuda, torch.float32)
    half = gallery_placement(2**20, 1024, cuda, free={"cuda": 10 * gib, "cpu": 40 * gib})
    assert (half.device, half.dtype) == (cuda, torch.float16)
    host = gallery_placement(2**20, 1024, cuda, free={"cuda": 4 * gib, "cpu": 40 * gib})
    assert (host.device, host.dtype) == (torch.device("cpu"), torch.float16)
    assert "2.15 GB in float16" in host.reason and "25% of the 42.9 GB free on cpu" in host.reason
    cramped = gallery_placement(2**20, 1024, torch.device("cpu"), free={"cpu": 4 * gib})
    assert (cramped.device, cramped.dtype) == (torch.device("cpu"), torch.float16) and "nowhere has room" in cramped.reason


def test_block_by_block_search_equals_the_whole_similarity_matrix(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(1000, 16, generator=generator), dim=1)
    queries = F.normalize(torch.randn(7, 16, generator=generator), dim=1)
    labels = torch.randint(-1, 5, (1000,), generator=generator)
    whole = (queries @ gallery.t()).topk(6, dim=1)
    whole_centroids = class_centroids(gallery, labels, 5)
    monkeypatch.setattr("herbarium.retrieval.SEARCH_BLOCK_ELEMENTS", 16 * 37)  # blocks of 37 rows, the last one short
    similarity, index = nearest(queries, gallery, 6)
    assert torch.equal(index, whole.indices) and torch.allclose(similarity, whole.values)
    blocked = class_centroids(gallery, labels, 5)
    assert torch.allclose(blocked[0], whole_centroids[0], atol=1e-6) and torch.equal(blocked[1], whole_centroids[1])
    half_similarity, half_index = nearest(queries, gallery.half(), 6)  # a float16 gallery: the same neighbours
    assert torch.equal(half_index, whole.indices) and torch.allclose(half_similarity, whole.values, atol=2e-3)


def test_a_gallery_that_would_not_fit_is_built_in_float16(untrained_run, monkeypatch, capsys):
    data, run = untrained_run
    loaded = load_run(run, torch.device("cpu"))
    split = read_split(data, "train", taxonomy=loaded.taxonomy)
    settings = EvaluationSettings(workers=0, device="cpu", batch_size=8)
    roomy = build_gallery(loaded, split, loaded.taxonomy, settings, torch.device("cpu"), ("species",))
    assert roomy.embeddings.dtype == torch.float32 and len(roomy.embeddings) == len(split)
    size = len(split) * loaded.model.num_features * 4
    monkeypatch.setattr("herbarium.retrieval._free_bytes", lambda device: 3 * size)  # float32 over 25%, float16 under
    small = build_gallery(loaded, split, loaded.taxonomy, settings, torch.device("cpu"), ("species",))
    assert small.embeddings.dtype == torch.float16
    assert torch.allclose(small.embeddings.float(), roomy.embeddings, atol=1e-3)
    assert torch.equal(small.labels["species"], roomy.labels["species"])
    assert torch.allclose(small.centroids["species"][0], roomy.centroids["species"][0], atol=1e-3)
    printed = capsys.readouterr().out
    assert "kept on cpu in float32" in printed and "kept on cpu in float16" in printed and "25% of the" in printed
