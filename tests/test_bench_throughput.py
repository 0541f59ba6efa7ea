"""bench/throughput.py at a tiny size on the CPU: every measurement runs through the engine's own step and loaders."""

from __future__ import annotations

import json

from fixtures import load_bench_script

throughput = load_bench_script("throughput")

TINY = ["--device", "cpu", "--trunk", "resnet10t", "--size", "32", "--batch-size", "4", "--eval-batch-size", "4",
        "--images", "8", "--small-trunk", "none", "--classes", "20,5,3", "--paths", "cpu",
        "--warmup", "1", "--windows", "1", "--steps", "1", "--workers", "1"]


def test_every_figure_is_measured_and_written(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert throughput.main([*TINY, "--out", str(out), "--tmp", str(tmp_path)]) == 0
    results = json.loads(out.read_text())
    assert results["complete"] is True
    rates = results["models"]["main"]["images_per_s"]
    assert set(rates) == {"model_only_train", "input_cpu", "train_cpu", "inference_ceiling", "tta_cpu"}
    assert all(rate > 0 for rate in rates.values())
    assert results["images_per_s"]["stats_cpu"] > 0
    printed = capsys.readouterr().out
    assert "  model_only_train: " in printed  # each figure is printed as soon as it is measured
    assert "end-to-end training, cpu input path" in printed  # and the table at the end


def test_a_model_measured_is_written_before_the_run_ends(tmp_path, monkeypatch):
    """A run stopped part-way (a time limit on a lent GPU) keeps the figures of every model it finished."""
    out = tmp_path / "throughput.json"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(throughput, "measure_stats", stop)
    try:
        throughput.main([*TINY, "--out", str(out), "--tmp", str(tmp_path)])
    except KeyboardInterrupt:
        pass
    results = json.loads(out.read_text())
    assert results["complete"] is False
    assert results["models"]["main"]["images_per_s"]["train_cpu"] > 0
