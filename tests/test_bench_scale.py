"""bench/scale.py at a tiny scale: the synthetic metadata is read as the real files are, and every step reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures import load_bench_script
from herbarium.data.readers import read_split

TINY = ["--scale", "0.0005", "--eval-batch", "16", "--eval-batches", "3", "--gallery-images", "64",
        "--embedding-dim", "32", "--sheets", "2", "--stats-images", "4"]

scale = load_bench_script("scale")


@pytest.mark.parametrize("size_name", ["h2020", "h2021"])
def test_synthetic_metadata_has_the_real_layout_and_a_long_tail(tmp_path, size_name):
    size = scale.SIZES[size_name].scaled(0.002)
    scale.write_metadata(size, tmp_path)
    raw = (tmp_path / "train" / "metadata.json").read_bytes()
    if size_name == "h2020":  # the 2020 train file is latin-1: not valid UTF-8
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
    split = read_split(tmp_path, "train", tuple(size.classes))
    assert len(split) == size.train and split.taxonomy.ranks == tuple(size.classes)
    assert [split.taxonomy.num_classes(rank) for rank in size.classes] == list(size.classes.values())
    assert split.taxonomy.names["species"][0].endswith(scale.LATIN1_AUTHOR)  # read back as written
    counts = np.bincount([s.category_id for s in split.samples])
    assert counts.min() >= 1 and counts.max() > 10 * np.median(counts)
    test = read_split(tmp_path, "test", tuple(size.classes))
    assert len(test) == size.test and not test.labelled


def test_every_step_reports_its_figures(tmp_path):
    args = scale.build_parser().parse_args(["--out", str(tmp_path), *TINY])
    size = scale.SIZES["h2020"].scaled(args.scale)
    scale.write_metadata(size, tmp_path / "h2020")
    results = {name: scale.run_step(name, "h2020", args) for name in scale.STEPS}
    assert set(results) == {"evaluate", "disagreement", "workers", "read_split", "index_build", "index_load", "stats",
                            "gallery"}
    assert results["index_build"]["images"] == results["index_load"]["images"] == size.train
    assert results["disagreement"]["median_ms_per_batch"] > 0
    assert all(figures["peak_resident_gb"] > 0 and figures["step_s"] >= 0 for figures in results.values())
    assert results["read_split"]["images"] == size.train
    evaluate = results["evaluate"]
    assert evaluate["images"] == 48 and evaluate["classes"] == size.classes["species"] and evaluate["batch_s"] > 0
    assert results["stats"]["images"] == 4 and results["stats"]["images_per_s"] > 0
    gallery = results["gallery"]
    assert gallery["images_built"] == 64 and gallery["embeddings_dtype"] == "float32"
    assert gallery["train_split_on_80gb_gpu_60_free"] == "cuda float32"
    assert results["workers"]["default_workers"] >= 1


def test_the_command_runs_steps_in_their_own_processes_and_writes_a_table(tmp_path):
    assert scale.main(["--out", str(tmp_path), "--sizes", "h2021", "--steps", "workers", *TINY]) == 0
    document = json.loads((tmp_path / "scale.json").read_text())
    assert document["results"]["h2021"]["workers"]["loader_workers"] >= 1
    assert "| h2021 | workers |" in (tmp_path / "scale.md").read_text()
    assert scale.main(["--out", str(tmp_path), "--steps", "nope"]) == 2


def test_the_evaluate_step_runs_where_device_says():
    if not torch.cuda.is_available():  # a clear refusal, not a traceback from the step's process
        assert scale.main(["--out", "unused", "--steps", "evaluate", "--device", "cuda", *TINY]) == 2
        return
    args = scale.build_parser().parse_args(["--out", "unused", "--device", "cuda", *TINY])
    figures = scale.run_step("evaluate", "h2021", args)
    assert figures["images"] == 48 and figures["batch_s"] > 0 and figures["device_peak_gb"] > 0
    assert figures["device"] == torch.cuda.get_device_name()
