"""Tests for herbarium/stats.py (collect-stats) and herbarium/stats_file.py."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import herbarium.stats_file as stats_file
from fixtures import COUNTS_2020, CATEGORIES_2020, truncate, write_csv_manifest
from herbarium.data.images import BadImageError, load_rgb
from herbarium.data.readers import CsvColumns, read_split
from herbarium.data.splits import stratified_sample
from herbarium.demo import make_demo_data
from herbarium import stats
from herbarium.stats import compute_stats, main, stats_transform
from herbarium.stats_file import IMAGENET_MEAN, IMAGENET_STD, default_stats_path, read_normalization

SIZE = 16


def _reference(split, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std in float64 over every pixel, all images concatenated."""
    transform = stats_transform(size)
    pixels = [transform(load_rgb(split.path(s), size)).numpy().astype(np.float64).reshape(3, -1) for s in split.samples]
    every = np.concatenate(pixels, axis=1)  # [3, total pixels]
    return every.mean(axis=1), every.std(axis=1)


@pytest.fixture
def train_split(herbarium2020):
    return read_split(herbarium2020["train"].root.parent, "train")


# ------------------------------------------------------------ compute_stats
def test_mean_std_equal_a_float64_reference(train_split):
    mean, std = _reference(train_split)
    stats = compute_stats(train_split, SIZE, workers=0, batch_size=4, progress=False)
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-9)
    assert not np.allclose(std, std.mean())  # the fixture's channels differ, so the check has teeth
    assert stats["num_images"] == 9 and stats["skipped_bad_images"] == 0
    assert stats["size"] == SIZE and stats["split"] == "train" and stats["workers"] == 0
    assert stats["source"] == str(train_split.source)
    assert stats["ranks"] == ["family", "genus", "species"]
    assert stats["images_per_s"] > 0


def test_workers_do_not_change_the_numbers(train_split):
    serial = compute_stats(train_split, SIZE, workers=0, batch_size=3, progress=False)
    parallel = compute_stats(train_split, SIZE, workers=2, batch_size=3, progress=False)
    np.testing.assert_allclose(parallel["mean"], serial["mean"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(parallel["std"], serial["std"], rtol=0, atol=1e-12)
    assert parallel["num_images"] == 9 and parallel["workers"] == 2


def test_class_counts(train_split):
    counts = compute_stats(train_split, SIZE, workers=0, progress=False)["class_counts"]
    assert counts["species"] == {c["name"]: COUNTS_2020[c["id"]] for c in CATEGORIES_2020}
    assert counts["genus"] == {"Achillea": 1, "Carex": 2, "Poa": 5, "Ranunculus": 1}
    assert counts["family"] == {"Asteraceae": 1, "Cyperaceae": 2, "Poaceae": 5, "Ranunculaceae": 1}


def test_class_counts_keep_classes_whose_names_repeat(tmp_path):
    """'nigra' under Carex (id 9) and Festuca (id 31) are two classes with their own counts."""
    header = ["path", "category_id", "family", "genus", "species"]
    rows = [{"path": f"{i}.jpg", "category_id": cid, "family": "F", "genus": genus, "species": species}
            for i, (cid, genus, species) in enumerate([(9, "Carex", "nigra"), (31, "Festuca", "nigra"),
                                                       (31, "Festuca", "nigra"), (20, "Poa", "annua")])]
    write_csv_manifest(tmp_path, "train", rows, header)
    split = read_split(tmp_path, "train", csv_columns=CsvColumns())
    counts = compute_stats(split, SIZE, workers=0, progress=False)["class_counts"]
    assert counts["species"] == {"nigra [9]": 1, "annua": 1, "nigra [31]": 2}
    assert counts["genus"] == {"Carex": 1, "Festuca": 2, "Poa": 1}


def test_bad_image_fails_naming_the_file(herbarium2020, train_split):
    bad = truncate(herbarium2020["train"].files[herbarium2020["train"].image_ids[5]])
    with pytest.raises(BadImageError, match=re.escape(str(bad))):
        compute_stats(train_split, SIZE, workers=0, progress=False)


def test_bad_image_skipped_and_counted(herbarium2020, train_split):
    written = herbarium2020["train"]
    truncate(written.files[written.image_ids[5]])
    stats = compute_stats(train_split, SIZE, workers=0, batch_size=4, skip_bad_images=True, progress=False)
    assert stats["skipped_bad_images"] == 1 and stats["num_images"] == 8
    good = dataclasses.replace(train_split, samples=[s for i, s in enumerate(train_split.samples) if i != 5])
    mean, std = _reference(good)
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-9)


def test_no_readable_image_at_all(herbarium2020, train_split):
    for path in herbarium2020["train"].files.values():
        path.unlink()
    with pytest.raises(ValueError, match=r"no readable image in split 'train'"):
        compute_stats(train_split, SIZE, workers=0, skip_bad_images=True, progress=False)


# ------------------------------------------------------------ collect-stats
def _args(data: Path, *extra: str) -> list[str]:
    return [str(data), "--size", str(SIZE), "--workers", "0", "--quiet", *extra]


def test_main_writes_the_json_and_prints_throughput(herbarium2020, capsys):
    data = herbarium2020["train"].root.parent
    assert main(_args(data)) == 0
    out = data / "train" / "stats.json"  # the default place
    stats = json.loads(out.read_text())
    mean, std = _reference(read_split(data, "train"))
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-9)
    assert stats["class_counts"]["genus"]["Poa"] == 5
    printed = capsys.readouterr().out
    assert f"9 images of split 'train' at {SIZE} px" in printed
    assert re.search(r"\d+ images/s with 0 workers", printed)
    assert "genus: 4 classes, per class min 1 / median 2 / max 5" in printed
    assert f"written to {out}" in printed
    assert not list(out.parent.glob("*.tmp"))


def test_main_ranks_and_out(herbarium2020, tmp_path, capsys):
    data = herbarium2020["train"].root.parent
    out = tmp_path / "elsewhere" / "s.json"
    main(_args(data, "--out", str(out), "--ranks", "family,species"))
    assert json.loads(out.read_text())["ranks"] == ["family", "species"]
    assert not (data / "train" / "stats.json").exists()


def test_main_fails_on_an_unreadable_image_and_skips_it_on_request(herbarium2020, tmp_path, capsys):
    written = herbarium2020["train"]
    bad = truncate(written.files[written.image_ids[0]])
    assert main(_args(written.root.parent, "--out", str(tmp_path / "s.json"))) == 2  # one line naming the file, status 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot read image {written.image_ids[0]!r} at {bad}") and error.count("\n") == 1
    assert not (tmp_path / "s.json").exists()
    main(_args(written.root.parent, "--out", str(tmp_path / "s.json"), "--skip-bad-images"))
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["skipped_bad_images"] == 1 and stats["num_images"] == 8
    assert "8 images of split 'train' at 16 px, 1 unreadable skipped" in capsys.readouterr().out


def test_console_script(herbarium2020, tmp_path):
    script = Path(sys.executable).parent / "collect-stats"
    if not script.is_file():
        pytest.skip("the collect-stats console script is not installed in this environment")
    out = tmp_path / "stats.json"
    done = subprocess.run([str(script), *_args(herbarium2020["train"].root.parent, "--out", str(out))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["num_images"] == 9
    assert "images/s" in done.stdout


# --------------------------------------------------------------- stats file
def test_read_normalization_from_a_file(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"mean": [0.7, 0.6, 0.5], "std": [0.2, 0.21, 0.22], "num_images": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalization = read_normalization(path)
    assert normalization.mean == (0.7, 0.6, 0.5) and normalization.std == (0.2, 0.21, 0.22)
    assert normalization.source == str(path)
    assert normalization.extra["num_images"] == 3


def test_read_normalization_reads_what_main_writes(herbarium2020, capsys):
    data = herbarium2020["train"].root.parent
    main(_args(data))
    written = json.loads((data / "train" / "stats.json").read_text())
    normalization = read_normalization(default_stats_path(data, "train"))
    assert normalization.mean == tuple(written["mean"]) and normalization.std == tuple(written["std"])


def test_imagenet_fallback_warns_once_per_process(monkeypatch, tmp_path):
    monkeypatch.setattr(stats_file, "_warned_imagenet", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # so only the module's own flag can stop a repeat
        first = read_normalization(None)
        second = read_normalization(tmp_path / "missing.json")
    assert first == second
    assert first.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert first.std == IMAGENET_STD == (0.229, 0.224, 0.225)
    assert first.source == "imagenet"
    assert len(caught) == 1
    assert "ImageNet mean/std" in str(caught[0].message)


def test_imagenet_warning_names_the_missing_file(monkeypatch, tmp_path):
    monkeypatch.setattr(stats_file, "_warned_imagenet", False)
    with pytest.warns(UserWarning, match=re.escape(f"({tmp_path / 'missing.json'} not found)")):
        read_normalization(tmp_path / "missing.json")


@pytest.mark.parametrize("content, problem", [
    ({"std": [0.2, 0.2, 0.2]}, "not a stats file"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "3 finite channels"),
    ({"mean": [0.5, float("nan"), 0.5], "std": [0.2, 0.2, 0.2]}, "3 finite channels"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}, "std > 0"),
])
def test_bad_stats_file_is_refused(tmp_path, content, problem):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"stats.json: .*{re.escape(problem)}"):
        read_normalization(path)


def test_default_stats_path(herbarium2020, herbarium2022):
    data2020 = herbarium2020["train"].root.parent
    assert default_stats_path(data2020, "train") == data2020 / "train" / "stats.json"
    data2022 = herbarium2022["train"].root
    assert default_stats_path(data2022, "train") == data2022 / "stats.json"


# ------------------------------------------------------------------ --sample
def _per_image_means(split, size: int = SIZE) -> np.ndarray:
    transform = stats_transform(size)
    return np.stack([transform(load_rgb(split.path(s), size)).numpy().astype(np.float64).reshape(3, -1).mean(axis=1)
                     for s in split.samples])  # [N, 3]


def test_a_stratified_sample_keeps_each_class_share(tmp_path):
    make_demo_data(tmp_path / "demo", seed=2, image_size=16, max_per_class=40, min_per_class=1, test_per_class=1,
                   num_families=2, genera_per_family=2, species_per_genus=3)
    split = read_split(tmp_path / "demo", "train")
    labels = np.array([str(s.category_id) for s in split.samples])
    for size in (1, 17, len(split) // 2, len(split)):
        chosen = stratified_sample(split, size, seed=3)
        assert len(chosen) == size == len(set(chosen.tolist())) and np.all(np.diff(chosen) > 0)
        for label in set(labels):
            share = size * np.mean(labels == label)
            assert np.floor(share) <= np.sum(labels[chosen] == label) <= np.ceil(share)
    assert np.array_equal(stratified_sample(split, 17, seed=3), stratified_sample(split, 17, seed=3))
    assert not np.array_equal(stratified_sample(split, 17, seed=3), stratified_sample(split, 17, seed=4))
    with pytest.raises(ValueError, match=f"--sample {len(split) + 1}: must be between 1 and the {len(split)} images"):
        stratified_sample(split, len(split) + 1)


def test_sample_measures_the_drawn_images_and_gives_their_standard_error(train_split):
    chosen = stratified_sample(train_split, 5, seed=1)
    subset = dataclasses.replace(train_split, samples=[train_split.samples[i] for i in chosen])
    stats = compute_stats(train_split, SIZE, workers=0, batch_size=2, progress=False, sample=5, seed=1)
    mean, std = _reference(subset)
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-9)
    means = _per_image_means(subset)
    expected = means.std(axis=0, ddof=1) * np.sqrt((1 - 5 / 9) / 5)  # without replacement from 9 images
    sample = stats["sample"]
    assert (sample["images"], sample["of"], sample["seed"], stats["num_images"]) == (5, 9, 1, 5)
    np.testing.assert_allclose(sample["mean_standard_error"], expected, rtol=1e-9)
    assert all(error > 0 for error in sample["std_standard_error"])
    assert stats["class_counts"]["genus"]["Poa"] == 5  # counts are the whole split's, read from the metadata
    whole = compute_stats(train_split, SIZE, workers=0, progress=False, sample=9)
    assert "sample" not in whole and whole["num_images"] == 9  # a sample of every image is the exact pass


def test_main_sample_prints_the_standard_error_and_the_progress_shows_the_time_left(herbarium2020, capsys, monkeypatch):
    data = herbarium2020["train"].root.parent
    monkeypatch.setattr(stats, "show_progress", lambda quiet=False, stream=None: not quiet)  # as on a terminal
    assert main([str(data), "--size", str(SIZE), "--workers", "0", "--sample", "4", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert f"a stratified sample of 4 of the 9 images (seed 2) of split 'train' at {SIZE} px" in captured.out
    assert re.search(r"standard error: mean \([\d.]+, [\d.]+, [\d.]+\)  std \(", captured.out)
    assert re.search(r"collect-stats train: 100%.*4/4 images \[[\d:]+ elapsed, [\d:]+ left", captured.err)
    assert json.loads((data / "train" / "stats.json").read_text())["sample"]["images"] == 4
    assert main([str(data), "--sample", "0"]) == 2
    assert "error: --sample 0: give a number of images of at least 1" in capsys.readouterr().err
