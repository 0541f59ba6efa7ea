"""bench/lt_splits.py: a long tail drawn from a split, and the rest of a split as a scoring split."""

from __future__ import annotations

import pytest

from fixtures import load_bench_script, write_herbarium2020
from herbarium.data.readers import read_json

lt_splits = load_bench_script("lt_splits")


def _ids(data, split):
    return {a["image_id"] for a in read_json(data / split / "metadata.json")["annotations"]}  # train is latin-1


def test_the_rest_of_a_long_tail_is_every_other_image_of_the_source(tmp_path):
    write_herbarium2020(tmp_path)
    assert lt_splits.main([str(tmp_path), "--source", "train", "--name", "train_lt", "--max", "3", "--min", "1"]) == 0
    assert lt_splits.main([str(tmp_path), "--source", "train", "--name", "train_rest", "--rest-of", "train_lt"]) == 0
    source, tail, rest = _ids(tmp_path, "train"), _ids(tmp_path, "train_lt"), _ids(tmp_path, "train_rest")
    assert tail and rest and not tail & rest and tail | rest == source
    images = read_json(tmp_path / "train_rest" / "metadata.json")["images"]
    assert all((tmp_path / "train_rest" / image["file_name"]).is_file() for image in images)


def test_rest_of_refuses_the_tail_options_it_would_ignore(tmp_path, capsys):
    write_herbarium2020(tmp_path)
    assert lt_splits.main([str(tmp_path), "--source", "train", "--name", "train_lt", "--max", "3", "--min", "1"]) == 0
    with pytest.raises(SystemExit):
        lt_splits.main([str(tmp_path), "--name", "train_rest", "--rest-of", "train_lt", "--max", "3", "--seed", "2"])
    assert "--max, --seed would be ignored" in capsys.readouterr().err
    assert not (tmp_path / "train_rest").exists()


def test_the_tail_options_shape_the_split_when_given_and_default_otherwise(tmp_path):
    write_herbarium2020(tmp_path)  # 9 training images, 1 to 3 per species
    assert lt_splits.main([str(tmp_path), "--name", "tail_default"]) == 0  # --max 70 --min 1: every image fits
    assert lt_splits.main([str(tmp_path), "--name", "one_each", "--max", "1", "--min", "1", "--seed", "3"]) == 0
    assert _ids(tmp_path, "tail_default") == _ids(tmp_path, "train")
    one_each = read_json(tmp_path / "one_each" / "metadata.json")["annotations"]
    species = [a["category_id"] for a in one_each]
    assert len(species) == len(set(species)) == len({a["category_id"] for a in read_json(tmp_path / "train" / "metadata.json")["annotations"]})
