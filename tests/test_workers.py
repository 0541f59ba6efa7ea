"""Loader workers per process: the machine's cores shared among the processes torchrun starts on it."""

from __future__ import annotations

import pytest

from fixtures import machine_with
from herbarium import runtime
from herbarium.data import gpu
from herbarium.data.loader import build_loader, prefetch_factor


@pytest.mark.parametrize("cores,local_processes,cpu_workers,byte_workers", [
    (96, "8", 12, 4), (2, "2", 1, 1), (2, "4", 1, 1), (16, None, 16, 4), (16, "1", 16, 4), (7, "2", 3, 3),
])
def test_each_process_gets_its_share_of_the_cores(monkeypatch, cores, local_processes, cpu_workers, byte_workers):
    machine_with(monkeypatch, cores, local_processes)
    assert gpu.loader_workers(None, "cpu") == cpu_workers
    assert gpu.loader_workers(None, "gpu") == byte_workers
    assert gpu.loader_workers(5, "cpu") == gpu.loader_workers(5, "gpu") == 5  # --workers wins
    assert gpu.loader_workers(0, "cpu") == 0


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path, monkeypatch):
    limit = tmp_path / "cpu.max"
    limit.write_text("800000 100000\n")
    assert runtime.cgroup_cpu_quota(limit) == 8
    limit.write_text("150000 100000\n")
    assert runtime.cgroup_cpu_quota(limit) == 2  # 1.5 CPUs of time: 2 workers
    limit.write_text("max 100000\n")
    assert runtime.cgroup_cpu_quota(limit) is None
    assert runtime.cgroup_cpu_quota(tmp_path / "missing") is None
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: 1)
    assert runtime.default_workers() == 1


def test_local_processes_reads_torchruns_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert runtime.local_processes() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    assert runtime.local_processes() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert runtime.local_processes() == 1


def test_prefetch_keeps_a_few_batches_ahead_per_process():
    assert prefetch_factor(0) is None
    assert [prefetch_factor(n) for n in (1, 2, 3, 4, 8, 12, 96)] == [4, 4, 3, 2, 1, 1, 1]


def test_validation_workers_are_not_kept_between_passes():
    data = list(range(8))
    assert build_loader(data, 4, 2).persistent_workers
    assert not build_loader(data, 4, 2, persistent=False).persistent_workers
    assert build_loader(data, 4, 2).prefetch_factor == 4
