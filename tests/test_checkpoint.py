"""Tests for herbarium/checkpoint.py: atomic saves, safe loads, RNG round trips."""

from __future__ import annotations

import os
import pickle
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from herbarium.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


class Opaque:
    """A custom class: loading it would mean running arbitrary unpickling code."""

    def __init__(self, value: int = 1) -> None:
        self.value = value


def _state(seed: int = 0) -> dict:
    """What a training checkpoint holds: model, optimizer, counters, config, RNG."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizers": [optimizer.state_dict()], "epoch": 3, "step": 120,
            "best": {"macro_f1": 0.25}, "config": {"data": {"ranks": ["family", "genus", "species"]}, "stats": None},
            "rng": rng_state()}


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------- save
def test_round_trip_and_no_temp_file(tmp_path):
    state = _state()
    path = tmp_path / "runs" / "last.pt"  # the folder is created
    save_checkpoint(state, path)
    assert sorted(os.listdir(path.parent)) == ["last.pt"]
    _assert_same(load_checkpoint(path), state)


def test_plain_weights_only_load_reads_it(tmp_path):
    state = _state()
    save_checkpoint(state, tmp_path / "last.pt")
    _assert_same(torch.load(tmp_path / "last.pt", weights_only=True), state)


def test_existing_file_is_replaced(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"an older, different file")
    save_checkpoint(_state(1), path)
    _assert_same(load_checkpoint(path)["model"], _state(1)["model"])
    save_checkpoint(_state(2), path)
    _assert_same(load_checkpoint(path)["model"], _state(2)["model"])
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint({"model": {}, "hook": lambda x: x}, path)  # lambdas cannot be pickled
    _assert_same(load_checkpoint(path)["model"], _state(1)["model"])
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_the_rename_is_flushed_by_syncing_the_folder(tmp_path, monkeypatch):
    """After os.replace, the folder itself is fsynced, so the new entry survives a power loss."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"))
        return real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", Path(target).name))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(_state(), tmp_path / "last.pt")
    assert events == [("fsync", "file"), ("replace", "last.pt"), ("fsync", "folder")]


# ------------------------------------------------------------------- load
def test_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Opaque(7)}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused to load: it holds pickled Python objects \(it needs .*Opaque\).*Never load a pickle"):
        load_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a herbarium checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "junk.pt")


# -------------------------------------------------------------------- RNG
def _draws() -> tuple:
    return (torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist(), np.random.randn(3).tolist(),
            np.random.rand(2).tolist(), random.random(), random.getrandbits(64))


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn(1)  # leaves numpy's second gaussian of the pair cached
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1
    save_checkpoint({"model": {}, "rng": state}, tmp_path / "rng.pt")
    expected = _draws()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != expected
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


def test_rng_state_holds_only_plain_values():
    state = rng_state()
    assert isinstance(state["torch"], torch.Tensor)
    assert state["numpy"]["keys"].dtype == torch.int64 and state["numpy"]["keys"].shape == (624,)
    assert isinstance(state["python"], list) and isinstance(state["python"][1], list)
