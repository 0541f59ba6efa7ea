"""Averaging, decoding and metrics of herbarium.evaluation on small constructed cases."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from herbarium.evaluation import (
    PathDecoder,
    average_views,
    consistent_predictions,
    ensemble,
    evaluate_predictions,
    inconsistent_mask,
    independent_predictions,
    macro_f1,
    rank_metrics,
    suggest_shot_thresholds,
    taxonomy_disagreement,
    top_k_accuracy,
)
from herbarium.evaluation.decoding import hybrid_decoding
from herbarium.evaluation.metrics import ancestor_table, hierarchical_distances, paired_bootstrap
from herbarium.taxonomy import Taxonomy

RANKS = ("family", "genus", "species")


def small_taxonomy() -> Taxonomy:
    """F1 > {G1 > {s1, s2}, G2 > {s3}}, F2 > {G3 > {s4}}; species indices 0..3 = s1..s4."""
    return Taxonomy.from_categories(
        [
            {"id": 10, "family": "F1", "genus": "G1", "species": "s1"},
            {"id": 11, "family": "F1", "genus": "G1", "species": "s2"},
            {"id": 12, "family": "F1", "genus": "G2", "species": "s3"},
            {"id": 13, "family": "F2", "genus": "G3", "species": "s4"},
        ],
        RANKS,
    )


def random_taxonomy(rng: random.Random) -> Taxonomy:
    families = rng.randint(1, 4)
    genus_family = [rng.randrange(families) for _ in range(rng.randint(1, 6))]
    records = []
    for species in range(rng.randint(1, 12)):
        genus = rng.randrange(len(genus_family))
        records.append({"id": species, "family": f"F{genus_family[genus]}", "genus": f"G{genus}", "species": f"s{species}"})
    return Taxonomy.from_categories(records, RANKS)


def log_probs_from(probabilities: dict[str, list[list[float]]]) -> dict[str, torch.Tensor]:
    return {rank: torch.tensor(p).log() for rank, p in probabilities.items()}


# ------------------------------------------------------------------ combine
def test_logit_mean_follows_one_confident_view_and_probability_mean_the_majority():
    # View 1 is very sure of class A; views 2 and 3 mildly prefer B.
    views = torch.tensor([[[10.0, 0.0]], [[0.0, 2.0]], [[0.0, 2.0]]])  # [V=3, B=1, C=2]
    by_logits = average_views(views, "logits")
    by_probs = average_views(views, "probs")
    assert by_logits.argmax(-1).item() == 0  # mean logits: A 3.33, B 1.33
    assert by_probs.argmax(-1).item() == 1  # mean probabilities: A 0.41, B 0.59
    expected_probs = torch.softmax(views, -1).mean(0)
    torch.testing.assert_close(by_probs.exp(), expected_probs)
    torch.testing.assert_close(by_logits, torch.log_softmax(views.mean(0), -1))


def test_average_views_weights_and_errors():
    views = torch.tensor([[[4.0, 0.0]], [[0.0, 4.0]]])
    weighted = average_views(views, "logits", weights=[3.0, 1.0])  # mean logits (3, 1)
    torch.testing.assert_close(weighted, torch.log_softmax(torch.tensor([[3.0, 1.0]]), -1))
    zero_weight = average_views(views, "probs", weights=[1.0, 0.0])
    torch.testing.assert_close(zero_weight, torch.log_softmax(views[0], -1))
    with pytest.raises(ValueError, match="logits"):
        average_views(views, "median")
    with pytest.raises(ValueError, match="2 score sets"):
        average_views(views, "logits", weights=[1.0])


def test_ensemble_averages_models_per_rank_and_keeps_ranks_only_some_models_have():
    model_a = {"species": torch.tensor([[2.0, 0.0]]), "genus": torch.tensor([[1.0, 0.0, 0.0]])}
    model_b = {"species": torch.tensor([[0.0, 4.0]])}
    combined = ensemble([model_a, model_b], weights=[1.0, 1.0])
    torch.testing.assert_close(combined["species"], torch.log_softmax(torch.tensor([[1.0, 2.0]]), -1))
    torch.testing.assert_close(combined["genus"], torch.log_softmax(model_a["genus"], -1))
    # Ensembling log-probabilities in logit mode equals ensembling the raw logits.
    normalised = ensemble([{k: torch.log_softmax(v, -1) for k, v in m.items()} for m in (model_a, model_b)])
    torch.testing.assert_close(normalised["species"], combined["species"])


# ----------------------------------------------------------------- decoding
def test_consistent_decoding_picks_the_path_the_coarse_heads_support():
    taxonomy = small_taxonomy()
    log_probs = log_probs_from({
        "species": [[0.30, 0.25, 0.05, 0.40]],  # own argmax: s4, which is in F2 > G3
        "genus": [[0.8, 0.1, 0.1]],
        "family": [[0.9, 0.1]],
    })
    independent = independent_predictions(log_probs)
    assert [independent[r].item() for r in RANKS] == [0, 0, 3]  # F1, G1, s4: not one path
    assert taxonomy_disagreement(independent, taxonomy) == 1.0
    consistent = consistent_predictions(log_probs, taxonomy)
    assert [consistent[r].item() for r in RANKS] == [0, 0, 0]  # F1 > G1 > s1
    assert taxonomy_disagreement(consistent, taxonomy) == 0.0
    # With the coarse heads weighted out, the species head decides alone.
    species_only = consistent_predictions(log_probs, taxonomy, rank_weights={"genus": 0.0, "family": 0.0})
    assert [species_only[r].item() for r in RANKS] == [1, 2, 3]  # F2 > G3 > s4


def test_hybrid_decoding_keeps_the_species_head_and_takes_the_coarse_ranks_from_the_path():
    taxonomy = small_taxonomy()
    log_probs = log_probs_from({
        "species": [[0.30, 0.25, 0.05, 0.40]],  # own argmax s4; the path F1 > G1 > s1 wins overall
        "genus": [[0.8, 0.1, 0.1]],
        "family": [[0.9, 0.1]],
    })
    heads = independent_predictions(log_probs)
    path_predictions, path_scores = PathDecoder(taxonomy).decode(log_probs)
    predictions, scores = hybrid_decoding(heads, log_probs, path_predictions, path_scores, "species")
    assert [predictions[r].item() for r in RANKS] == [0, 0, 3]  # F1, G1 from the path; s4 from its head
    assert torch.equal(scores["species"], log_probs["species"]) and torch.equal(scores["genus"], path_scores["genus"])
    without_species = {rank: value for rank, value in log_probs.items() if rank != "species"}
    path_only = PathDecoder(taxonomy).decode(without_species)
    predictions, _ = hybrid_decoding(independent_predictions(without_species), without_species, *path_only, "species")
    assert all(torch.equal(predictions[r], path_only[0][r]) for r in RANKS)  # no species head: the path throughout


def test_consistent_decoding_returns_ranks_without_a_head_from_the_path():
    taxonomy = small_taxonomy()
    log_probs = log_probs_from({"species": [[0.1, 0.1, 0.7, 0.1]], "family": [[0.6, 0.4]]})
    consistent = consistent_predictions(log_probs, taxonomy)
    assert [consistent[r].item() for r in RANKS] == [0, 1, 2]  # F1 > G2 > s3


@pytest.mark.parametrize("seed", range(40))
def test_consistent_decoding_is_always_a_valid_path_and_the_best_one(seed):
    rng = random.Random(seed)
    taxonomy = random_taxonomy(rng)
    generator = torch.Generator().manual_seed(seed)
    heads = [rank for rank in RANKS if rng.random() < 0.7] or ["species"]
    logits = {rank: torch.randn(9, taxonomy.num_classes(rank), generator=generator) * 3 for rank in heads}
    weights = {rank: rng.uniform(0.2, 2.0) for rank in heads}
    decoder = PathDecoder(taxonomy, weights, max_elements=max(1, 2 * taxonomy.num_categories))  # several blocks
    predicted = decoder.predictions(logits)
    paths = taxonomy.path_table()  # [N, 3]
    species = predicted["species"]
    for i, rank in enumerate(RANKS):
        assert torch.equal(predicted[rank], paths[species, i])  # every rank lies on the species' path
    assert taxonomy_disagreement(predicted, taxonomy) == 0.0
    # Brute force: no other path scores higher.
    log_probs = {rank: torch.log_softmax(logits[rank], -1) for rank in heads}
    brute = torch.stack([
        sum(weights[rank] * log_probs[rank][:, paths[p, RANKS.index(rank)]] for rank in heads)
        for p in range(taxonomy.num_categories)
    ], dim=1)  # [B, N]
    torch.testing.assert_close(brute.gather(1, species[:, None]).squeeze(1), brute.max(1).values)
    for rank, scores in decoder.rank_scores(logits).items():
        assert scores.shape == (9, taxonomy.num_classes(rank))
        torch.testing.assert_close(scores.max(1).values, brute.max(1).values)
    # One pass gives both, equal to the separate calls.
    together, together_scores = decoder.decode(logits)
    assert all(torch.equal(together[rank], predicted[rank]) for rank in RANKS)
    assert all(torch.equal(together_scores[rank], scores) for rank, scores in decoder.rank_scores(logits).items())


def test_block_size_does_not_change_the_decoding():
    taxonomy = random_taxonomy(random.Random(3))
    logits = {rank: torch.randn(33, taxonomy.num_classes(rank)) for rank in RANKS}
    whole = PathDecoder(taxonomy).predictions(logits)
    blocked = PathDecoder(taxonomy, max_elements=1).predictions(logits)  # one image per block
    assert all(torch.equal(whole[rank], blocked[rank]) for rank in RANKS)
    empty = PathDecoder(taxonomy).predictions({rank: logits[rank][:0] for rank in RANKS})
    assert all(empty[rank].shape == (0,) for rank in RANKS)


def path_by_path_decoding(log_probs: dict[str, torch.Tensor], taxonomy: Taxonomy, weights: dict[str, float]):
    """Consistent decoding the straightforward way: every rank's term gathered to every path and summed coarse to
    fine, each rank's scores a scatter-max over all the paths; ``(predictions, rank scores)``."""
    table = taxonomy.path_table()  # [N, R]
    first = next(iter(log_probs.values()))
    paths = torch.zeros(first.shape[0], taxonomy.num_categories)
    for rank in taxonomy.ranks:
        if rank in log_probs:
            paths.add_(log_probs[rank].index_select(1, table[:, taxonomy.rank_index(rank)]), alpha=weights.get(rank, 1.0))
    scores = {}
    for i, rank in enumerate(taxonomy.ranks):
        out = torch.full((first.shape[0], taxonomy.num_classes(rank)), float("-inf"))
        scores[rank] = out.scatter_reduce_(1, table[:, i].expand_as(paths), paths, reduce="amax")
    best = paths.argmax(dim=1)
    return {rank: table[best, i] for i, rank in enumerate(taxonomy.ranks)}, scores


@pytest.mark.parametrize("seed", range(12))
def test_decoding_down_and_up_the_tree_equals_the_path_by_path_sum(seed):
    rng = random.Random(seed)
    ranks = ("order", "family", "genus", "species")
    genera = rng.randint(1, 30)
    family_of = [rng.randrange(max(1, genera // 3)) for _ in range(genera)]
    records = [{"id": s, "order": f"O{family_of[g] % 3}", "family": f"F{family_of[g]}", "genus": f"G{g}", "species": f"s{s}"}
               for s, g in enumerate(rng.randrange(genera) for _ in range(rng.randint(1, 120)))]
    taxonomy = Taxonomy.from_categories(records, ranks)
    generator = torch.Generator().manual_seed(seed)
    heads = [rank for rank in ranks if rng.random() < 0.75] or ["species"]
    log_probs = {rank: torch.log_softmax(torch.randn(13, taxonomy.num_classes(rank), generator=generator) * 3, -1)
                 for rank in heads}
    for weights in ({}, {rank: rng.uniform(0.2, 2.0) for rank in heads}):
        decoder = PathDecoder(taxonomy, weights, max_elements=rng.choice([1, 5 * taxonomy.num_categories, 2**23]))
        predictions, scores = decoder.decode(log_probs, normalised=True)
        expected_predictions, expected_scores = path_by_path_decoding(log_probs, taxonomy, weights)
        assert all(torch.equal(predictions[rank], expected_predictions[rank]) for rank in ranks)
        for rank in ranks:
            if weights:  # the same terms in the same order, summed by kernels that may round the last bit apart
                torch.testing.assert_close(scores[rank], expected_scores[rank], rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(scores[rank], expected_scores[rank])


def test_view_mean_reads_a_model_output_layout_as_the_weighted_sum_does():
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(8, 4, 301, generator=generator) * 4  # [B, V, C]: how a model's per-view logits come
    for views in (output.transpose(0, 1), output.transpose(0, 1).contiguous()):  # [V, B, C], strided and not
        for weights in (None, [1.0, 2.0, 0.0, 0.5]):
            w = torch.tensor(weights or [1.0] * 4) / sum(weights or [1.0] * 4)
            expected = torch.log_softmax((w[:, None, None] * views).sum(0), dim=-1)
            averaged = average_views(views, "logits", weights)
            torch.testing.assert_close(averaged, expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(averaged.argmax(-1), expected.argmax(-1))


def test_disagreement_counts_images_whose_heads_leave_the_tree():
    taxonomy = small_taxonomy()
    predictions = {
        "family": torch.tensor([0, 0, 1, 0]),
        "genus": torch.tensor([0, 1, 2, 2]),  # image 3: G3 is under F2, not F1
        "species": torch.tensor([1, 0, 3, 3]),  # image 1: s1 is under G1, not G2
    }
    assert inconsistent_mask(predictions, taxonomy).tolist() == [False, True, False, True]
    assert taxonomy_disagreement(predictions, taxonomy) == 0.5
    # Without a genus prediction, species is checked against family directly.
    no_genus = {"family": predictions["family"], "species": predictions["species"]}
    assert inconsistent_mask(no_genus, taxonomy).tolist() == [False, False, False, True]
    # A decoder keeps its maps between batches and gives the same answer.
    decoder = PathDecoder(taxonomy)
    for _ in range(2):
        assert decoder.inconsistent_mask(predictions).tolist() == [False, True, False, True]
        assert decoder.inconsistent_mask(no_genus).tolist() == [False, False, False, True]


# ------------------------------------------------------------------ metrics
def test_macro_f1_is_kaggles_including_predicted_classes_absent_from_the_answers():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 3]  # class 3 never appears in the answers: adds a zero
    expected = f1_score(y_true, y_pred, average="macro")
    assert macro_f1(y_true, y_pred) == pytest.approx(expected)
    # By hand: F1 = 2/3 (class 0), 0.8 (class 1), 0 (class 2), 0 (class 3).
    assert macro_f1(y_true, y_pred) == pytest.approx((2 / 3 + 0.8) / 4)
    assert rank_metrics(y_true, y_pred)["macro_f1"] == pytest.approx(expected)


def test_top_k_accuracy_on_constructed_scores():
    scores = torch.tensor([
        [0.9, 0.05, 0.03, 0.02],  # true 0: rank 1
        [0.1, 0.2, 0.3, 0.4],  # true 0: rank 4
        [0.1, 0.5, 0.3, 0.1],  # true 2: rank 2
    ])
    y_true = [0, 0, 2]
    assert top_k_accuracy(y_true, scores, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(y_true, scores, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(y_true, scores, 5) == 1.0  # k clipped to 4 classes
    metrics = rank_metrics(y_true, scores.argmax(1), scores)
    assert (metrics["top1"], metrics["top5"], metrics["top5_k"]) == (pytest.approx(1 / 3), 1.0, 4)


def test_shot_groups_split_images_by_the_training_count_of_their_true_class():
    train_counts = [150, 101, 100, 20, 19, 1]  # many, many, medium, medium, few, few
    y_true = [0, 1, 1, 2, 3, 3, 4, 5]
    y_pred = [0, 0, 1, 2, 3, 0, 0, 0]
    groups = rank_metrics(y_true, y_pred, train_counts=train_counts)["shot_groups"]
    assert groups["many"] == {"accuracy": pytest.approx(2 / 3), "images": 3, "classes": 2, "mean_class_f1": pytest.approx((1 / 3 + 2 / 3) / 2)}
    assert (groups["medium"]["accuracy"], groups["medium"]["images"]) == (pytest.approx(2 / 3), 3)
    assert (groups["few"]["accuracy"], groups["few"]["images"]) == (0.0, 2)
    empty = rank_metrics([0, 1], [0, 1], train_counts=[500, 300])["shot_groups"]
    assert empty["few"] == {"accuracy": None, "images": 0, "classes": 0, "mean_class_f1": None}
    custom = rank_metrics(y_true, y_pred, train_counts=train_counts, thresholds=(2, 19))["shot_groups"]
    assert (custom["many"]["images"], custom["medium"]["images"], custom["few"]["images"]) == (6, 1, 1)  # many > 19, medium 2-19, few < 2


def test_suggested_thresholds_keep_the_usual_definition_when_every_group_has_classes():
    assert suggest_shot_thresholds([3, 50, 400, 1200]) == (20, 100)
    assert suggest_shot_thresholds([0, 0]) == (20, 100)


def test_suggested_thresholds_on_small_sets_give_the_rarest_third_to_the_few_shot_group():
    small = list(range(1, 31))  # 1..30 training images: no class is many-shot under the usual rule
    low, high = suggest_shot_thresholds(small)
    assert (low, high) == (11, 20)
    counts = np.array(small)
    assert ((counts < low).sum(), ((counts >= low) & (counts <= high)).sum(), (counts > high).sum()) == (10, 10, 10)
    # An exponential long tail with many classes at 1-2 images: quantiles alone gave low = 1, an empty few group.
    long_tail = np.array([1] * 12 + [2] * 8 + [3, 4, 6, 9, 13, 20, 30, 45, 70] * 2)
    low, high = suggest_shot_thresholds(long_tail)
    few = long_tail < low
    assert few.sum() >= len(long_tail) / 3 and long_tail[few].max() < long_tail[~few].min()
    assert low <= high
    assert suggest_shot_thresholds([5, 5, 5]) == (6, 6)  # ties: the rarest classes are all few-shot


def test_hierarchical_distance_counts_ranks_up_to_the_first_shared_ancestor():
    taxonomy = small_taxonomy()
    ancestors, above = ancestor_table(taxonomy, "species")
    assert above == ["genus", "family"]
    # s1 -> s2 same genus (1), s1 -> s3 same family (2), s1 -> s4 nothing shared (3).
    assert hierarchical_distances(np.array([0, 0, 0]), np.array([1, 2, 3]), ancestors).tolist() == [1, 2, 3]
    genus_ancestors, _ = ancestor_table(taxonomy, "genus")
    assert hierarchical_distances(np.array([0, 0]), np.array([1, 2]), genus_ancestors).tolist() == [1, 2]
    summary = rank_metrics([0, 0, 0, 0, 3], [0, 1, 2, 3, 3], ancestors=ancestors, ancestor_ranks=above)["hierarchical_distance"]
    assert summary == {
        "mistakes": 3,
        "mean": 2.0,
        "histogram": {"1": 1, "2": 1, "3": 1},
        "levels": {"1": "genus", "2": "family", "3": "none"},
    }


def test_per_class_rows_and_most_confused_pairs():
    names = ["a", "b", "c"]
    metrics = rank_metrics([0, 0, 0, 1, 1, 2], [1, 1, 0, 0, 1, 2], train_counts=[7, 8, 9], class_names=names)
    assert metrics["per_class"][0] == {
        "class": 0, "name": "a", "train_count": 7, "support": 3, "predicted": 2,
        "precision": 0.5, "recall": pytest.approx(1 / 3), "f1": pytest.approx(0.4),
    }
    pairs = [(p["true_name"], p["predicted_name"], p["count"]) for p in metrics["confused_pairs"]]
    assert pairs == [("a", "b", 2), ("b", "a", 1)]
    assert metrics["confusion"] == {"classes": [0, 1], "names": ["a", "b"], "matrix": [[1, 2], [1, 1]]}


def _plain_json_types(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json_types(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json_types(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def test_evaluate_predictions_covers_every_rank_with_plain_json_values():
    taxonomy = small_taxonomy()
    species_true = torch.tensor([0, 1, 2, 3, 3, 0])
    species_scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    species_pred = species_scores.argmax(1)
    paths = taxonomy.path_table()
    y_true = {rank: paths[species_true, i] for i, rank in enumerate(RANKS)}
    y_pred = {rank: paths[species_pred, i] for i, rank in enumerate(RANKS)}
    counts = {rank: taxonomy.counts([10, 10, 11, 12, 13, 13, 13], rank) for rank in RANKS}
    results = evaluate_predictions(y_true, y_pred, {"species": species_scores}, taxonomy, counts)
    assert list(results) == list(RANKS)
    assert results["species"]["macro_f1"] == pytest.approx(f1_score(species_true, species_pred, average="macro"))
    assert results["genus"]["top5"] is None  # no genus scores given
    assert results["family"]["hierarchical_distance"]["levels"] == {"1": "none"}
    assert results["species"]["shot_thresholds"] == list(suggest_shot_thresholds(counts["species"]))
    assert _plain_json_types(results)
    json.dumps(results, allow_nan=False)


def test_rank_metrics_rejects_inconsistent_inputs():
    with pytest.raises(ValueError, match="disagree on the class count"):
        rank_metrics([0], [0], scores=np.zeros((1, 3)), train_counts=[1, 2])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        rank_metrics([0, 2], [0, 1], train_counts=[1, 2])
    assert math.isclose(rank_metrics([1], [1], train_counts=[0, 4])["top1"], 1.0)


def test_paired_bootstrap_interval_holds_the_difference_and_shrinks_with_agreement():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, 400)
    better = np.where(rng.random(400) < 0.8, truth, rng.integers(0, 10, 400))
    worse = np.where(rng.random(400) < 0.5, truth, rng.integers(0, 10, 400))
    interval = paired_bootstrap(truth, better, worse, resamples=200)
    assert interval["low"] <= interval["delta"] <= interval["high"] and interval["low"] > 0
    same = paired_bootstrap(truth, better, better, resamples=50)
    assert same["delta"] == same["low"] == same["high"] == 0.0


def test_paired_bootstrap_difference_is_scikit_learns_macro_f1_difference():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 30, 300)
    ours = np.where(rng.random(300) < 0.7, truth, rng.integers(0, 40, 300))
    theirs = np.where(rng.random(300) < 0.6, truth, rng.integers(0, 40, 300))
    expected = f1_score(truth, ours, average="macro", zero_division=0) - f1_score(truth, theirs, average="macro", zero_division=0)
    assert paired_bootstrap(truth, ours, theirs, resamples=20)["delta"] == pytest.approx(expected, abs=1e-12)
