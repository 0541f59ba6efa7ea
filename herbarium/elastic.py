"""Resuming a run on another number of processes: an elastic restart, or a run of 8 GPUs continued on 4.

What a run has done is counted in global batches: a step of ``G`` images
(``--batch-size`` x processes, times ``--accum-steps`` per update), the
``k``-th of an epoch being positions ``[k * G, (k + 1) * G)`` of the epoch's
order (:class:`~herbarium.data.samplers.EpochSampler`). The schedule counts
steps. So a run continues exactly on ``W'`` processes when each of them
takes ``G / W'`` images per batch: the steps per epoch, the learning rate
at every step and the images of every step are those of the uninterrupted
run (BatchNorm statistics see other groupings of the same images). The
checkpoint records the world size and the position in images
(``samples_done``); :func:`continue_on` works out the per-process batch and
the batch to continue from, or says in one line why the position cannot be
carried over.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from herbarium.config import TrainConfig
from herbarium.errors import UsageError


def per_process_batch(batch_size: int, saved_world: int, world: int) -> int:
    """The ``--batch-size`` that keeps the global batch of ``batch_size`` x ``saved_world`` on ``world`` processes."""
    global_batch = batch_size * saved_world
    if global_batch % world:
        fits = ", ".join(str(n) for n in range(1, global_batch + 1) if global_batch % n == 0 and n <= 64)
        raise UsageError(
            f"--resume on {world} processes: the run trained {global_batch} images per batch ({batch_size} on each of "
            f"{saved_world} processes), which does not split evenly over {world}, so its schedule and samples cannot "
            f"continue exactly; resume with a number of processes that divides {global_batch} ({fits}), e.g. "
            f"torchrun --nproc-per-node {max(n for n in range(1, world + 1) if global_batch % n == 0)}")
    return global_batch // world


def batches_done(samples_done: int, batch_size: int, world: int) -> int:
    """Batches of the epoch each of ``world`` processes has done at ``samples_done`` images into it."""
    global_batch = batch_size * world
    if samples_done % global_batch:
        raise UsageError(f"--resume: the checkpoint stopped {samples_done} images into its epoch, not a whole number of "
                         f"batches of {global_batch} ({batch_size} on each of {world} processes); resume on the number of "
                         "processes that wrote it, or from the checkpoint of an epoch end")
    return samples_done // global_batch


def continue_on(cfg: TrainConfig, saved_run: Mapping[str, Any], world: int) -> TrainConfig:
    """``cfg`` with the per-process batch a resume on ``world`` processes needs, the change recorded in ``cfg.changes``.

    ``saved_run`` is the checkpoint's ``run`` entry. A checkpoint that does
    not record its world size (older ones) is taken to have been written by
    as many processes as resume it.
    """
    saved_world = int(saved_run.get("world_size") or world)
    if saved_world == world:
        return cfg
    batch_size = per_process_batch(cfg.data.batch_size, saved_world, world)
    change = {"option": "--batch-size", "from": cfg.data.batch_size, "to": batch_size,
              "why": f"resumed on {world} processes instead of {saved_world}: the same {batch_size * world} images per batch"}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size),
                               changes=[*cfg.changes, change])
