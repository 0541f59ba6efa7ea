"""``--decode``: the trainer and the evaluator run on either input path and agree.

The device path runs here on a CPU device: ``device_decode_available`` is
patched to say the CPU decodes JPEGs, so ``auto`` and ``gpu`` pick the path
that a CUDA machine with nvJPEG takes, with torchvision's CPU decoder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import machine_with
from herbarium import build
from herbarium.data import splits
from herbarium import engine, stats
from herbarium.checkpoint import load_checkpoint
from herbarium.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from herbarium.data import gpu
from herbarium.demo import make_demo_data
from herbarium.distributed import DistributedContext
from herbarium.data.readers import read_split
from herbarium.data.transforms import resize_size
from herbarium.evaluation.report import throughput_section
from herbarium.evaluation.runner import LoadedModel, build_view_loader, evaluate
from herbarium.evaluation.settings import EvaluationSettings
from herbarium.evaluation.tta import InputProfile
from herbarium.models.config import ModelConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates its decoders

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, seed=2, image_size=32, max_per_class=12, min_per_class=2, test_per_class=2)
    return out


@pytest.fixture
def device_decoding(monkeypatch):
    """Let the CPU count as a device that decodes JPEGs, as a CUDA device with nvJPEG does."""
    monkeypatch.setattr(gpu, "device_decode_available", lambda device: True)


def tiny_config(data_dir: Path, out: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(
        out=str(out), epochs=2, seed=1, device="cpu",
        data=DataConfig(data=str(data_dir), val_split="test", size=32, batch_size=16, workers=0),
        model=ModelConfig(pretrained=False, trunk="resnet10t", dropout=0.0),
        loss=LossConfig(levels=("species", "genus", "family")),
        optim=OptimConfig(optim="adam@2e-3:0", schedule="cosine"),
    )
    return dataclasses.replace(cfg, **changes)


def with_decode(cfg: TrainConfig, decode: str) -> TrainConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decode=decode))


def first_batches(cfg: TrainConfig, decode: str) -> tuple[dict, dict]:
    train, val = splits.read_train_val(cfg)
    loaders = build.build_loaders(cfg, train, val, build.resolve_normalization(cfg), DistributedContext(), CPU, decode)
    assert loaders.decode == decode and isinstance(loaders.train, gpu.GpuLoader) == (decode == "gpu")
    loaders.sampler.set_epoch(1)
    return next(iter(loaders.train)), next(iter(loaders.val))


def test_gpu_decoding_without_a_decoding_device_is_a_clear_error(demo, tmp_path):
    with pytest.raises(ValueError, match="--decode gpu needs a CUDA device"):
        engine.train(with_decode(tiny_config(demo, tmp_path / "run"), "gpu"))


def test_both_paths_give_the_trainer_the_same_batches(demo, tmp_path):
    cfg = tiny_config(demo, tmp_path / "run")
    std = build.resolve_normalization(cfg).std
    one_level = 1 / 255 / min(std)
    for cpu, device in zip(first_batches(cfg, "cpu"), first_batches(cfg, "gpu")):
        assert torch.equal(device["index"], cpu["index"]) and torch.equal(device["targets"], cpu["targets"])
        assert device["image"].shape == cpu["image"].shape
        difference = (device["image"] - cpu["image"]).abs()
        assert difference.max() <= 2 * one_level + 1e-6  # JPEG decoder and resize-kernel tolerance
        assert difference.mean() < 0.01


def test_training_on_the_device_path_logs_it_and_resumes_exactly(demo, tmp_path, device_decoding):
    """Batches are made by a background thread a batch ahead; the run still replays bit for bit."""
    engine.train(with_decode(tiny_config(demo, tmp_path / "straight"), "gpu"))
    engine.train(with_decode(tiny_config(demo, tmp_path / "paused", stop_after_epoch=1), "gpu"))
    engine.train(with_decode(tiny_config(demo, tmp_path / "paused"), "gpu"), resume=tmp_path / "paused")
    records = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [record["input_path"] for record in records] == ["gpu", "gpu"]
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "paused" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


@pytest.mark.parametrize("cores,local_processes,expected", [(16, None, "cpu"), (8, None, "cpu"), (7, None, "gpu"), (16, "4", "gpu")])
def test_auto_takes_the_device_path_only_with_few_cores_per_gpu(monkeypatch, device_decoding, cores, local_processes, expected):
    machine_with(monkeypatch, cores, local_processes)
    assert gpu.select_decode("auto", "cpu") == expected
    assert gpu.select_decode("gpu", "cpu") == "gpu" and gpu.select_decode("cpu", "cpu") == "cpu"


def test_collect_stats_on_the_device_path(demo, tmp_path, device_decoding):
    measured = {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / f"{decode}.json"
        stats.main([str(demo), "--size", "24", "--workers", "0", "--batch-size", "5", "--decode", decode, "--out", str(out),
                    "--quiet"])
        measured[decode] = json.loads(out.read_text())
    cpu, device = measured["cpu"], measured["gpu"]
    assert device["input_path"] == "gpu" and cpu["input_path"] == "cpu"
    assert device["num_images"] == cpu["num_images"] == len(read_split(demo, "train"))
    assert device["class_counts"] == cpu["class_counts"]
    np.testing.assert_allclose(device["mean"], cpu["mean"], atol=2e-3)  # JPEG decoder and resize-kernel tolerance
    np.testing.assert_allclose(device["std"], cpu["std"], atol=2e-3)


def test_evaluation_on_the_device_path_matches_the_cpu_path(demo, tmp_path, device_decoding):
    cfg = with_decode(tiny_config(demo, tmp_path / "run", epochs=3), "cpu")
    engine.train(cfg)
    views = ("plain", "flip", "train")
    outputs = {}
    for decode in ("cpu", "gpu"):
        settings = EvaluationSettings(views=views, workers=0, device="cpu", batch_size=8, decode=decode)
        evaluate([cfg.out], demo, "test", out=tmp_path / decode, settings=settings)
        metrics = json.loads((tmp_path / decode / "metrics.json").read_text())
        assert metrics["throughput"]["input_path"] == decode
        rows = list(csv.DictReader((tmp_path / decode / "predictions.csv").open()))
        outputs[decode] = (metrics, {row["image_id"]: row for row in rows})
    (_, cpu_rows), (gpu_metrics, gpu_rows) = outputs["cpu"], outputs["gpu"]
    assert gpu_metrics["throughput"]["decoder_routes"] == {"device": len(cpu_rows)}
    assert gpu_rows.keys() == cpu_rows.keys()
    columns = ("family", "genus", "species", "category_id")  # the primary predictions, not the top-5
    agreeing = sum(all(gpu_rows[key][c] == cpu_rows[key][c] for c in columns) for key in cpu_rows)
    assert agreeing >= 0.9 * len(cpu_rows), f"{agreeing} of {len(cpu_rows)} predictions agree"


def test_views_are_decoded_no_smaller_than_the_most_demanding_view_needs(demo):
    """A `train` view crops like training does, so it needs training's decode side (2 x size), not the resize side."""
    split = read_split(demo, "test")
    profile = InputProfile(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "crop_flip")
    loaded = LoadedModel(None, TrainConfig(), split.taxonomy, profile, {}, Path("run"))
    sides = {}
    for views in (("plain",), ("plain", "train")):
        for decode in ("cpu", "gpu"):
            loader = build_view_loader(split, split.taxonomy, [loaded], EvaluationSettings(views=views, workers=0), CPU, decode)
            sides[views, decode] = loader.decoder.decode_min_side if decode == "gpu" else loader.dataset.images.decode_min_side
    assert sides[("plain",), "cpu"] == sides[("plain",), "gpu"] == resize_size(32)
    assert sides[("plain", "train"), "cpu"] == sides[("plain", "train"), "gpu"] == 64


def test_the_report_names_the_input_path_and_the_decoder_routes():
    section = throughput_section({"images_per_s": 10.0, "input_path": "gpu", "decoder_routes": {"device": 7, "pil": 1}})
    labels = [row[0] for row in section.tables[0].rows]
    assert labels[1:] == ["input path (where JPEGs are decoded)", "images decoded on the device",
                          "images decoded with PIL (device decoder could not)"]
