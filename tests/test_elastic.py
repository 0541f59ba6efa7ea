"""Resuming on another number of processes, and the loader workers each process runs, with torchrun on gloo.

A run stopped mid-epoch on 2 processes and resumed on 1 (and the other way
round) must take, step by step, the learning rate and the images of a run
that never stopped. The batches each process trains are logged by
``tests/fault_wrapper.py`` (``STEP_LOG``), which also kills a process at a
chosen forward pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import tiny_train_config, torchrun_demo_data
from herbarium.checkpoint import load_checkpoint
from herbarium.data.gpu import loader_workers
from herbarium.elastic import batches_done, continue_on, per_process_batch
from herbarium.errors import UsageError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WRAPPER = Path(__file__).resolve().parent / "fault_wrapper.py"
# 2 epochs of 5 steps of 8 images (the training split holds 47), a checkpoint every 2 steps.
TRAIN = ["--val-split", "test", "--size", "32", "--trunk", "resnet10t", "--no-pretrained", "--dropout", "0.2", "--optim", "adam@2e-3:0",
         "--schedule", "cosine", "--seed", "3", "--device", "cpu", "--log-every", "1", "--epochs", "2",
         "--checkpoint-every", "2", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return torchrun_demo_data(tmp_path_factory.mktemp("torchrun") / "data")


def launch(processes: int, args: list[str], log: Path, attempt: int = 0, fault: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The training command on ``processes`` processes (torchrun for more than one), logging its steps."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "STEP_LOG": str(log), "ATTEMPT": str(attempt),
           **(fault or {})}
    for name in ("TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        env.pop(name, None)
    if processes == 1:
        env["RANK"] = "0"  # names the process for the step log and the fault, as torchrun would
        command = [sys.executable, str(WRAPPER), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   "--max-restarts", "0", "--monitor-interval", "0.5", str(WRAPPER), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def steps(log: Path, attempts: dict[int, int | None]) -> dict[int, tuple[int, float, list[int]]]:
    """step -> (epoch, lr, sorted images of the step over every process), from the attempts' logs.

    ``attempts[a]``: the last step of attempt ``a`` to keep (the checkpoint it
    was resumed from), None for all of them.
    """
    merged: dict[int, tuple[int, float, list[int]]] = {}
    for attempt, last in attempts.items():
        for part in sorted(log.parent.glob(f"{log.name}.{attempt}.*")):
            for record in map(json.loads, part.read_text().splitlines()):
                if last is not None and record["step"] > last:
                    continue
                epoch, lr, images = merged.get(record["step"], (record["epoch"], record["lr"], []))
                assert (epoch, lr) == (record["epoch"], record["lr"]), "the processes disagree on a step"
                merged[record["step"]] = (epoch, lr, sorted(images + record["index"]))
    return dict(sorted(merged.items()))


def interrupted_then_resumed(data: Path, out: Path, first: int, then: int, batch_size: int) -> tuple[dict, subprocess.CompletedProcess]:
    """A run on ``first`` processes whose last process dies at its 4th forward pass, resumed on ``then`` processes."""
    log = out.parent / f"{out.name}.steps"
    crashed = launch(first, [str(data), *TRAIN, "--workers", "0", "--batch-size", str(batch_size), "--out", str(out)], log,
                     fault={"FAULT_RANK": str(first - 1), "FAULT_AT": "4"})
    assert crashed.returncode != 0
    checkpoint = load_checkpoint(out / "checkpoints" / "last.pt")["run"]
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (0, 2, 2)
    assert (checkpoint["world_size"], checkpoint["samples_done"]) == (first, 16)
    resumed = launch(then, ["--resume", str(out)], log, attempt=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return steps(log, {0: checkpoint["global_step"], 1: None}), resumed


def test_resume_on_another_number_of_processes_continues_the_uninterrupted_run(data, tmp_path):
    # The uninterrupted run: 2 processes of 4 images, loader workers left to the default (the cores shared out).
    reference = launch(2, [str(data), *TRAIN, "--batch-size", "4", "--out", str(tmp_path / "straight")],
                       tmp_path / "straight.steps")
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = steps(tmp_path / "straight.steps", {0: None})
    assert sorted(expected) == list(range(1, 11)) and all(len(images) == 8 for _, _, images in expected.values())
    for epoch in (0, 1):  # whole global batches of the epoch's order: 40 of the 47 images, none twice
        seen = [i for e, _, images in expected.values() if e == epoch for i in images]
        assert len(seen) == len(set(seen)) == 40

    # 2 processes of 4 images -> 1 process, which takes the whole batch of 8.
    two_to_one, resumed = interrupted_then_resumed(data, tmp_path / "two_to_one", first=2, then=1, batch_size=4)
    assert two_to_one == expected
    assert "written by 2 processes, continuing on 1" in resumed.stdout
    change = json.loads((tmp_path / "two_to_one" / "config.json").read_text())["changes"][-1]
    assert (change["option"], change["from"], change["to"], change["step"]) == ("--batch-size", 4, 8, 2)

    # 1 process of 8 images -> 2 processes of 4.
    one_to_two, resumed = interrupted_then_resumed(data, tmp_path / "one_to_two", first=1, then=2, batch_size=8)
    assert one_to_two == expected
    assert "written by 1 processes, continuing on 2" in resumed.stdout


def test_each_process_under_torchrun_runs_its_share_of_the_cores(data, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    share = loader_workers(None, "cpu")
    done = launch(2, [str(data), *TRAIN, "--batch-size", "4", "--epochs", "1", "--stop-after-epoch", "1",
                      "--out", str(tmp_path / "run")], tmp_path / "run.steps")
    assert done.returncode == 0, done.stderr[-3000:]
    noun = "worker" if share == 1 else "workers"
    assert f"input path cpu ({share} {noun} per process)" in done.stdout, done.stdout


# ---------------------------------------------------------------------------------------------- the rule
def test_the_global_batch_is_shared_out_over_the_new_number_of_processes():
    assert per_process_batch(64, saved_world=8, world=4) == 128
    assert per_process_batch(64, saved_world=4, world=8) == 32
    assert per_process_batch(8, saved_world=2, world=2) == 8
    with pytest.raises(UsageError) as raised:
        per_process_batch(8, saved_world=2, world=3)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("--resume on 3 processes: the run trained 16 images per batch (8 on each of 2 processes)")
    assert message.endswith("(1, 2, 4, 8, 16), e.g. torchrun --nproc-per-node 2")


def test_the_position_in_images_becomes_each_process_batches():
    assert batches_done(96, batch_size=16, world=2) == 3
    assert batches_done(96, batch_size=32, world=1) == 3
    with pytest.raises(UsageError, match="stopped 40 images into its epoch, not a whole number of batches of 32"):
        batches_done(40, batch_size=16, world=2)


def test_continue_on_records_the_batch_change_and_keeps_a_same_size_resume(tmp_path):
    cfg = tiny_train_config(tmp_path / "data", tmp_path / "run", batch_size=8)
    assert continue_on(cfg, {"world_size": 2}, 2) is cfg
    assert continue_on(cfg, {}, 4) is cfg  # an older checkpoint: taken as written by as many processes
    moved = continue_on(cfg, {"world_size": 2}, 1)
    assert moved.data.batch_size == 16 and cfg.data.batch_size == 8
    assert moved.changes[-1]["option"] == "--batch-size" and (moved.changes[-1]["from"], moved.changes[-1]["to"]) == (8, 16)
