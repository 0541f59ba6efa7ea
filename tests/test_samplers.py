"""Tests for herbarium/data/samplers.py and herbarium/data/splits.py."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from herbarium.data.readers import DatasetSplit, Sample
from herbarium.data.samplers import SAMPLERS, EpochSampler, sample_weights
from herbarium.data.splits import stratified_holdout
from herbarium.taxonomy import Taxonomy


def _keys(num_samples, epoch, *, start=0, **kwargs) -> list[tuple[int, int]]:
    sampler = EpochSampler(num_samples, **kwargs)
    sampler.set_epoch(epoch, start=start)
    keys = list(sampler)
    assert len(keys) == len(sampler)
    return keys


# --------------------------------------------------------- epoch orders
def test_order_is_a_permutation_and_a_pure_function_of_seed_and_epoch():
    torch.manual_seed(0)
    reference = _keys(50, 2, seed=3)
    assert sorted(index for index, _ in reference) == list(range(50))
    # Whatever came before and whatever the global RNG: the same (seed, epoch), the same keys.
    sampler = EpochSampler(50, seed=3)
    for epoch in (0, 1, 5):
        sampler.set_epoch(epoch)
        list(sampler)
    torch.manual_seed(12345)
    sampler.set_epoch(2)
    assert list(sampler) == reference
    indices = [index for index, _ in reference]
    assert [index for index, _ in _keys(50, 3, seed=3)] != indices
    assert [index for index, _ in _keys(50, 2, seed=4)] != indices


def test_augmentation_seeds_differ_by_position_and_fit_in_31_bits():
    seeds = [seed for _, seed in _keys(50, 0, seed=1)]
    assert len(set(seeds)) == 50
    assert all(0 <= seed < 2**31 for seed in seeds)
    assert seeds != [seed for _, seed in _keys(50, 1, seed=1)]


@pytest.mark.parametrize("start", [0, 1, 17, 39])
def test_resume_yields_exactly_the_tail(start):
    full = _keys(40, 4, seed=7)
    assert _keys(40, 4, seed=7, start=start) == full[start:]


@pytest.mark.parametrize("start", [0, 3, 5])
def test_resume_on_each_replica_yields_its_tail(start):
    for rank in (0, 1):
        full = _keys(11, 1, seed=2, num_replicas=2, rank=rank)
        assert _keys(11, 1, seed=2, num_replicas=2, rank=rank, start=start) == full[start:]


def test_two_replicas_partition_the_order_with_wrap_padding():
    single = _keys(11, 3, seed=5)
    rank0 = _keys(11, 3, seed=5, num_replicas=2, rank=0)
    rank1 = _keys(11, 3, seed=5, num_replicas=2, rank=1)
    assert len(rank0) == len(rank1) == 6
    # Position p goes to rank p % 2; the 12th position wraps to the first.
    interleaved = [key for pair in zip(rank0, rank1) for key in pair]
    assert [index for index, _ in interleaved] == [index for index, _ in single] + [single[0][0]]
    # A sample gets the same augmentation seed at the same position, whatever the number of replicas.
    assert interleaved[:11] == single
    assert Counter(index for index, _ in interleaved) == Counter({**{i: 1 for i in range(11)}, single[0][0]: 2})


def test_more_replicas_than_samples_still_fills_every_replica():
    per_rank = [_keys(3, 0, seed=0, num_replicas=8, rank=rank) for rank in range(8)]  # padding 5 > 3 samples
    assert [len(keys) for keys in per_rank] == [1] * 8
    assert {keys[0][0] for keys in per_rank} == {0, 1, 2}


# ---------------------------------------------------------- class weights
LABELS = [0] * 6 + [1] * 3 + [2]


def test_balanced_weights_equalise_expected_class_frequency():
    weights = sample_weights(LABELS, "balanced")
    assert weights.dtype == torch.float64
    assert weights.tolist() == [1 / 6] * 6 + [1 / 3] * 3 + [1.0]
    labels = torch.tensor(LABELS)
    mass = torch.stack([weights[labels == c].sum() for c in range(3)])
    # A draw picks class c with probability mass[c] / mass.sum(): 1/3 each.
    assert torch.allclose(mass / mass.sum(), torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-15)


def test_sqrt_weights_give_class_mass_sqrt_n():
    weights = sample_weights(torch.tensor(LABELS), "sqrt")
    labels = torch.tensor(LABELS)
    mass = [weights[labels == c].sum().item() for c in range(3)]
    assert mass == pytest.approx([math.sqrt(6), math.sqrt(3), 1.0], abs=1e-12)


def test_no_weights_and_unknown_mode():
    assert SAMPLERS == ("none", "balanced", "sqrt")
    assert sample_weights(LABELS, "none") is None
    with pytest.raises(ValueError, match=r"'inverse'.*\['none', 'balanced', 'sqrt'\]"):
        sample_weights(LABELS, "inverse")


def test_weighted_order_is_pure_and_never_draws_zero_weight():
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    torch.manual_seed(0)
    first = _keys(5, 1, weights=weights, seed=9)
    torch.manual_seed(1)
    assert _keys(5, 1, weights=weights, seed=9) == first
    drawn = [index for epoch in range(20) for index, _ in _keys(5, epoch, weights=weights, seed=9)]
    assert len(drawn) == 100
    assert set(drawn) <= {1, 3, 4}


# -------------------------------------------------------------- holdout
SIZES = {"A": 10, "B": 5, "C": 2, "D": 1, "E": 1}


@pytest.fixture
def long_tail() -> DatasetSplit:
    taxonomy = Taxonomy.from_categories(
        [{"id": c, "family": "F", "genus": f"G{c}", "species": c} for c in SIZES])
    samples = [Sample(f"{c}{k}", f"{c}/{k}.jpg", c) for c, n in SIZES.items() for k in range(n)]
    return DatasetSplit("train", Path("/data/train"), samples, taxonomy, Path("/data/train/metadata.json"), "csv")


def test_holdout_is_stratified_and_keeps_singletons_in_train(long_tail):
    train, val = stratified_holdout(long_tail, 0.2, seed=0)
    # round(0.2 n) per class, never a class's last image: A 2, B 1, C round(0.4) = 0.
    assert Counter(s.category_id for s in val.samples) == {"A": 2, "B": 1}
    assert {"D0", "E0"} <= {s.image_id for s in train.samples}
    assert val.name == "train-holdout" and train.name == "train"
    assert train.taxonomy is long_tail.taxonomy and val.image_root == long_tail.image_root


def test_holdout_never_takes_a_class_s_last_image(long_tail):
    train, val = stratified_holdout(long_tail, 0.7, seed=0)
    # round(0.7) = 1 for a singleton and round(1.4) = 1 for a pair: the last image always stays.
    assert Counter(s.category_id for s in val.samples) == {"A": 7, "B": 4, "C": 1}
    assert Counter(s.category_id for s in train.samples) == {"A": 3, "B": 1, "C": 1, "D": 1, "E": 1}


def test_holdout_is_disjoint_and_complete(long_tail):
    train, val = stratified_holdout(long_tail, 0.5, seed=1)
    train_ids, val_ids = [s.image_id for s in train.samples], [s.image_id for s in val.samples]
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == sorted(s.image_id for s in long_tail.samples)
    assert Counter(s.category_id for s in val.samples) == {"A": 5, "B": 2, "C": 1}  # round(2.5) = 2
    # Both parts keep the original order.
    order = {s.image_id: i for i, s in enumerate(long_tail.samples)}
    assert [order[i] for i in train_ids] == sorted(order[i] for i in train_ids)
    assert [order[i] for i in val_ids] == sorted(order[i] for i in val_ids)


def test_holdout_is_a_pure_function_of_the_seed(long_tail):
    first = stratified_holdout(long_tail, 0.3, seed=4)[1].samples
    assert stratified_holdout(long_tail, 0.3, seed=4)[1].samples == first
    others = {tuple(s.image_id for s in stratified_holdout(long_tail, 0.3, seed=seed)[1].samples) for seed in range(5)}
    assert len(others) > 1


def test_holdout_refuses_bad_fractions_and_empty_validation(long_tail):
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="in \\(0, 1\\)"):
            stratified_holdout(long_tail, fraction)
    singletons = DatasetSplit("train", long_tail.image_root, [s for s in long_tail.samples if s.category_id in ("D", "E")],
                              long_tail.taxonomy, long_tail.source, "csv")
    with pytest.raises(ValueError, match="leaves no validation image"):
        stratified_holdout(singletons, 0.5)


def test_the_same_global_batch_takes_the_same_images_per_step_on_any_number_of_processes():
    def steps(replicas: int, batch: int) -> list[list[int]]:
        ranks = []
        for rank in range(replicas):
            sampler = EpochSampler(47, seed=5, num_replicas=replicas, rank=rank, batch_size=batch)
            sampler.set_epoch(1)
            ranks.append([index for index, _ in sampler])
        return [sorted(i for r in ranks for i in r[k * batch:(k + 1) * batch]) for k in range(len(ranks[0]) // batch)]

    two_by_four, one_by_eight, four_by_two = steps(2, 4), steps(1, 8), steps(4, 2)
    assert two_by_four == one_by_eight == four_by_two
    assert len(two_by_four) == 5 and len({i for step in two_by_four for i in step}) == 40  # whole batches of 8, none twice
    resumed = EpochSampler(47, seed=5, num_replicas=1, rank=0, batch_size=8)  # 2 steps done on 2 processes, then 1
    resumed.set_epoch(1, start=2 * 8)
    assert sorted(index for index, _ in resumed) == sorted(i for step in two_by_four[2:] for i in step)
