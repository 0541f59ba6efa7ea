"""Faults at scale (issue 15), with torchrun on the CPU and gloo: the slow tests of the suite (``-m "not slow"`` skips them).

* a rank killed mid-epoch under ``torchrun --max-restarts 1``: the restarted job
  continues from the run's last checkpoint by itself and ends with the weights
  of an uninterrupted run;
* a rank that dies without restarts: the job ends within seconds, torchrun
  naming the rank;
* a rank that hangs: the others give up after ``--dist-timeout`` with a
  one-line error instead of waiting forever.

The fault is injected by ``tests/fault_wrapper.py``, not by the library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures import torchrun_demo_data
from herbarium.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WRAPPER = Path(__file__).resolve().parent / "fault_wrapper.py"
# 2 epochs of 5 steps per process, checkpoints every 2 steps.
TRAIN = ["--val-split", "test", "--size", "32", "--batch-size", "4", "--workers", "0", "--trunk", "resnet10t", "--no-pretrained",
         "--dropout", "0.2", "--optim", "adam@2e-3:0", "--schedule", "cosine", "--seed", "3", "--device", "cpu",
         "--log-every", "1", "--epochs", "2", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return torchrun_demo_data(tmp_path_factory.mktemp("torchrun") / "data")


def torchrun(data: Path, out: Path, restarts: int, fault: dict[str, str] | None = None, extra: tuple[str, ...] = (),
             timeout: float = 400) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(fault or {})}
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(restarts), "--monitor-interval", "0.5", str(WRAPPER), str(data), *TRAIN, *extra,
               "--out", str(out)]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def test_killed_rank_restarts_and_ends_with_the_weights_of_an_uninterrupted_run(data, tmp_path):
    straight, _ = torchrun(data, tmp_path / "straight", restarts=0)
    assert straight.returncode == 0, straight.stderr[-3000:]

    # Rank 1 dies at its 4th forward pass of epoch 1 (after the step-2 checkpoint); torchrun restarts both.
    restarted, _ = torchrun(data, tmp_path / "restarted", restarts=1, fault={"FAULT_RANK": "1", "FAULT_AT": "4"})
    output = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, output[-3000:]
    assert "resuming" in output and "at epoch 1, batch 3 (step 2)" in output  # continued mid-epoch, not from scratch

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "restarted" / "checkpoints" / "last.pt")
    assert a["run"]["epoch"] == b["run"]["epoch"] == 2
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    records = [json.loads(line) for line in (tmp_path / "restarted" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_dead_rank_without_restarts_ends_the_job_quickly_naming_the_rank(data, tmp_path):
    done, seconds = torchrun(data, tmp_path / "dead", restarts=0, fault={"FAULT_RANK": "1", "FAULT_AT": "3"}, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert seconds < 240
    # torchrun's report: the first failure is rank 1 with the exit code it died with.
    root_cause = output[output.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : 17" in root_cause, output[-3000:]


def test_hung_rank_makes_the_others_fail_after_the_timeout(data, tmp_path):
    done, seconds = torchrun(data, tmp_path / "hung", restarts=0, extra=("--dist-timeout", "10"), timeout=300,
                             fault={"FAULT_RANK": "1", "FAULT_AT": "3", "FAULT_MODE": "hang"})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert seconds < 240
    assert "error: process 0 of 2 lost the others at step 2 (one died, or hung past the 10 s timeout)" in output, output[-3000:]
