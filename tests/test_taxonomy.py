"""Tests for herbarium/taxonomy.py on a hand-made four-rank tree."""

from __future__ import annotations

import json

import pytest
import torch

from herbarium.taxonomy import DEFAULT_RANKS, Taxonomy, TaxonomyError

RANKS4 = ("order", "family", "genus", "species")

# Given out of id order on purpose: indices must not depend on record order.
RECORDS = [
    {"id": 7, "species": "Poa annua", "genus": "Poa", "family": "Poaceae", "order": "Poales"},
    {"id": 30, "species": "Carex nigra", "genus": "Carex", "family": "Cyperaceae", "order": "Poales"},
    {"id": 2, "species": "Poa glauca", "genus": "Poa", "family": "Poaceae", "order": "Poales"},
    {"id": 11, "species": "Anemone nemorosa", "genus": "Anemone", "family": "Ranunculaceae", "order": "Ranunculales"},
    {"id": 4, "species": "Ranunculus acris", "genus": "Ranunculus", "family": "Ranunculaceae", "order": "Ranunculales"},
]
# By hand: species sorted by id (2, 4, 7, 11, 30); coarser ranks sorted by name.
ORDERS = ["Poales", "Ranunculales"]
FAMILIES = ["Cyperaceae", "Poaceae", "Ranunculaceae"]
GENERA = ["Anemone", "Carex", "Poa", "Ranunculus"]
SPECIES = ["Poa glauca", "Ranunculus acris", "Poa annua", "Anemone nemorosa", "Carex nigra"]
PATHS = [(0, 1, 2, 0), (1, 2, 3, 1), (0, 1, 2, 2), (1, 2, 0, 3), (0, 0, 1, 4)]  # (order, family, genus, species)


@pytest.fixture
def tree() -> Taxonomy:
    return Taxonomy.from_categories(RECORDS, RANKS4)


def _record(cid, species, genus, family, order="O"):
    return {"id": cid, "species": species, "genus": genus, "family": family, "order": order}


# -------------------------------------------------------------- indexing
def test_indices_are_contiguous_and_sorted(tree):
    assert tree.ranks == RANKS4
    assert tree.finest == "species"
    assert tree.category_ids == [2, 4, 7, 11, 30]
    assert tree.names == {"order": ORDERS, "family": FAMILIES, "genus": GENERA, "species": SPECIES}
    assert tree.paths == PATHS
    assert [tree.num_classes(rank) for rank in RANKS4] == [2, 3, 4, 5]
    assert tree.num_categories == 5
    for rank in RANKS4:
        used = sorted({path[tree.rank_index(rank)] for path in tree.paths})
        assert used == list(range(tree.num_classes(rank)))


def test_record_order_does_not_change_indices(tree):
    assert Taxonomy.from_categories(list(reversed(RECORDS)), RANKS4).to_dict() == tree.to_dict()


def test_string_ids_sort_as_text():
    records = [_record("b", "B b", "B", "F"), _record("a", "A a", "A", "F"), _record("c", "C c", "C", "F")]
    taxonomy = Taxonomy.from_categories(records)
    assert taxonomy.ranks == DEFAULT_RANKS
    assert taxonomy.category_ids == ["a", "b", "c"]
    assert taxonomy.category_index("c") == 2


def test_targets_and_category_index(tree):
    assert tree.category_index(11) == 3
    assert tree.targets(11) == {"order": 1, "family": 2, "genus": 0, "species": 3}
    assert tree.targets(30, ["species", "genus"]) == {"species": 4, "genus": 1}
    assert tree.has_category(7) and not tree.has_category(8)
    with pytest.raises(TaxonomyError, match="8"):
        tree.category_index(8)


def test_path_table(tree):
    assert torch.equal(tree.path_table(), torch.tensor(PATHS))
    assert tree.path_table().dtype == torch.long
    expected = torch.tensor([[0, 1], [1, 2], [2, 1], [3, 2], [4, 0]])  # (species, family) columns
    assert torch.equal(tree.path_table(["species", "family"]), expected)


def test_parents(tree):
    assert tree.parents("species").tolist() == [2, 3, 2, 0, 1]  # genus of each species
    assert tree.parents("genus").tolist() == [2, 0, 1, 2]  # Anemone, Carex, Poa, Ranunculus -> family
    assert tree.parents("family").tolist() == [0, 0, 1]  # Cyperaceae, Poaceae -> Poales
    assert tree.parents("species").dtype == torch.long
    with pytest.raises(TaxonomyError, match="coarsest"):
        tree.parents("order")


def loop_ancestor_map(taxonomy: Taxonomy, rank: str, ancestor: str) -> list[int]:
    """The Python loop over every category that ``ancestor_map`` replaced: the reference it must equal."""
    r, a = taxonomy.rank_index(rank), taxonomy.rank_index(ancestor)
    mapping = [-1] * taxonomy.num_classes(rank)
    for path in taxonomy.paths:
        mapping[path[r]] = path[a]
    return mapping


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_maps_equal_the_loop_over_categories(seed):
    generator = torch.Generator().manual_seed(seed)
    orders = torch.randint(1, 4, (1,), generator=generator).item()
    family_order = torch.randint(0, orders, (12,), generator=generator).tolist()
    genus_family = torch.randint(0, 12, (60,), generator=generator).tolist()
    species_genus = torch.randint(0, 60, (400,), generator=generator).tolist()
    records = [{"id": 1000 - i, "species": f"s{i}", "genus": f"G{g}", "family": f"F{genus_family[g]}",
                "order": f"O{family_order[genus_family[g]]}"} for i, g in enumerate(species_genus)]
    taxonomy = Taxonomy.from_categories(records, RANKS4)
    assert torch.equal(taxonomy.path_table(), torch.tensor(taxonomy.paths))
    for r, rank in enumerate(RANKS4):
        for ancestor in RANKS4[: r + 1]:
            assert taxonomy.ancestor_map(rank, ancestor).tolist() == loop_ancestor_map(taxonomy, rank, ancestor)
        if r:
            assert taxonomy.parents(rank).tolist() == loop_ancestor_map(taxonomy, rank, RANKS4[r - 1])


def test_maps_are_built_once_and_handed_out_as_copies(tree):
    first = tree.ancestor_map("species", "family")
    first[:] = -7
    tree.path_table()[:] = -7
    assert tree.ancestor_map("species", "family").tolist() == [1, 2, 1, 2, 0]
    assert torch.equal(tree.path_table(), torch.tensor(PATHS))


def test_ancestor_map(tree):
    assert tree.ancestor_map("species", "order").tolist() == [0, 1, 0, 1, 0]
    assert tree.ancestor_map("species", "family").tolist() == [1, 2, 1, 2, 0]
    assert tree.ancestor_map("genus", "order").tolist() == [1, 0, 0, 1]
    assert tree.ancestor_map("genus", "genus").tolist() == [0, 1, 2, 3]
    # Chaining one-rank parents gives the same map as asking for the ancestor directly.
    chained = tree.parents("family")[tree.parents("genus")[tree.parents("species")]]
    assert torch.equal(chained, tree.ancestor_map("species", "order"))
    with pytest.raises(TaxonomyError, match="finer"):
        tree.ancestor_map("order", "species")


def test_parents_among_links_each_level_to_the_nearest_coarser_level_given(tree):
    links = tree.parents_among(("species", "family", "order"))  # genus not trained: family is species's parent
    assert {rank: parent for rank, (parent, _) in links.items()} == {"species": "family", "family": "order"}
    assert links["species"][1].tolist() == [1, 2, 1, 2, 0]
    assert links["family"][1].tolist() == tree.parents("family").tolist()
    assert tree.parents_among(("genus",)) == {}


def test_counts(tree):
    ids = [7, 7, 2, 30, 11, 11, 11]
    assert tree.counts(ids, "species") == [1, 0, 2, 3, 1]
    assert tree.counts(ids, "genus") == [3, 1, 3, 0]
    assert tree.counts(ids, "family") == [1, 3, 3]
    assert tree.counts(ids, "order") == [4, 3]
    assert tree.counts([], "genus") == [0, 0, 0, 0]
    with pytest.raises(TaxonomyError, match="99"):
        tree.counts([7, 99], "genus")


def test_unknown_rank_names_the_known_ones(tree):
    with pytest.raises(TaxonomyError, match=r"'kingdom'.*\['order', 'family', 'genus', 'species'\]"):
        tree.num_classes("kingdom")


# ------------------------------------------------------------ round trip
def test_dict_round_trip_through_json(tree):
    restored = Taxonomy.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert restored == tree
    assert restored.ranks == RANKS4 and isinstance(restored.ranks, tuple)
    assert restored.paths == PATHS
    assert restored.targets(4) == tree.targets(4)
    assert torch.equal(restored.parents("genus"), tree.parents("genus"))


# ------------------------------------------------------------ validation
def test_duplicate_ids_are_named():
    records = RECORDS + [dict(RECORDS[0]), dict(RECORDS[2])]  # ids 7 and 2 twice
    with pytest.raises(TaxonomyError, match=r"duplicate category ids: 2, 7 \(2 in all\)"):
        Taxonomy.from_categories(records, RANKS4)


def test_many_duplicates_show_the_first_few_and_the_count():
    records = [_record(i, f"S {i}", "G", "F") for i in range(7)] * 2
    with pytest.raises(TaxonomyError, match=r"0, 1, 2, 3, 4 and 2 more \(7 in all\)"):
        Taxonomy.from_categories(records)


def test_missing_rank_value_names_the_categories():
    records = [dict(r) for r in RECORDS]
    records[1]["genus"] = None  # id 30
    records[3]["genus"] = ""  # id 11
    with pytest.raises(TaxonomyError, match=r"no 'genus' value: 30, 11 \(2 in all\)"):
        Taxonomy.from_categories(records, RANKS4)


def test_rank_missing_from_the_records_is_named():
    records = [{k: v for k, v in r.items() if k != "order"} for r in RECORDS]
    with pytest.raises(TaxonomyError, match=r"\['order'\] not found"):
        Taxonomy.from_categories(records, RANKS4)


def test_missing_id_field():
    with pytest.raises(TaxonomyError, match="'category_id'"):
        Taxonomy.from_categories(RECORDS, RANKS4, id_key="category_id")


def test_genus_under_two_families_is_named():
    records = RECORDS + [_record(40, "Poa nigra", "Poa", "Cyperaceae", "Poales")]
    with pytest.raises(TaxonomyError) as error:
        Taxonomy.from_categories(records, RANKS4)
    message = str(error.value)
    assert "genus classes under more than one family" in message
    assert "Poa (under ['Cyperaceae', 'Poaceae'])" in message
    assert "(1 in all)" in message


def test_family_under_two_orders_is_checked_too():
    records = RECORDS + [_record(41, "Carex alba", "Carex", "Cyperaceae", "Ranunculales")]
    with pytest.raises(TaxonomyError, match=r"family classes under more than one order: .*Cyperaceae"):
        Taxonomy.from_categories(records, RANKS4)


def test_many_conflicts_show_the_first_few_and_the_count():
    records = []
    for g in range(6):  # genera G0..G5, each under two families
        records += [_record(2 * g, f"s{2 * g}", f"G{g}", "F1"), _record(2 * g + 1, f"s{2 * g + 1}", f"G{g}", "F2")]
    with pytest.raises(TaxonomyError, match=r"G0 .*G4 .* and 1 more \(6 in all\)"):
        Taxonomy.from_categories(records)


def test_species_names_may_repeat_across_genera():
    """The finest rank is keyed by id: 'vulgaris' under two genera is two classes."""
    records = [_record(1, "vulgaris", "Thymus", "Lamiaceae"), _record(2, "vulgaris", "Abies", "Pinaceae")]
    taxonomy = Taxonomy.from_categories(records)
    assert taxonomy.names["species"] == ["vulgaris", "vulgaris"]
    assert taxonomy.parents("species").tolist() == [1, 0]  # Thymus, Abies


def test_empty_input_is_refused():
    with pytest.raises(TaxonomyError, match="empty"):
        Taxonomy.from_categories([])
    with pytest.raises(TaxonomyError, match="at least one rank"):
        Taxonomy.from_categories(RECORDS, ())
