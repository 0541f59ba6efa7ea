"""The layout of a run folder, in one place.

::

    RUN/
      run.json             the marker written first: a run made this folder (only such a folder is ever cleared)
      .lock                held (flock) by the process training in the folder
      config.json          the resolved TrainConfig (what the run is)
      taxonomy.json        ranks, class names and category ids, in class index order
      normalization.json   the mean/std the run fed its trunk, their source, training counts per rank
      log.jsonl            one record per epoch
      summary.csv          the same, one flat row per epoch (timm's summary.csv)
      checkpoints/         last.pt, best.pt (with validation), snapshot_<k>.pt, swa.pt; a run is evaluated with last.pt
      tb/                  TensorBoard
      o2u_weights.csv      O2U sample weights (--o2u)
      rebalance.json       what herbarium rebalance did, in a run it wrote (its only checkpoint is best.pt)
      eval/SPLIT/          tta_eval.py's report, metrics and submission
      export/              herbarium export

Every command that reads or writes a run asks :class:`RunDir` where things
are, resolves a run-or-checkpoint argument with :func:`locate_checkpoint`,
and rebuilds a trained model with :func:`model_from_checkpoint`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from herbarium.atomic import write_atomic
from herbarium.checkpoint import CheckpointError
from herbarium.config import TrainConfig
from herbarium.models import build_model, parents_in_state_dict
from herbarium.stats_file import Normalization
from herbarium.taxonomy import Taxonomy

MARKER = "run.json"
LOCK = ".lock"
CONFIG = "config.json"
TAXONOMY = "taxonomy.json"
NORMALIZATION = "normalization.json"
LEGACY_NORMALIZATION = "stats.json"  # the name older runs gave it (the same as collect-stats' file); read, never written
LOG = "log.jsonl"
SUMMARY = "summary.csv"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
O2U_WEIGHTS = "o2u_weights.csv"
REBALANCE_RECORD = "rebalance.json"
RUN_FILES = (CONFIG, TAXONOMY, NORMALIZATION)  # what evaluation needs beside a checkpoint
TRAINING_OUTPUTS = (CONFIG, TAXONOMY, NORMALIZATION, LOG, CHECKPOINTS, TENSORBOARD, O2U_WEIGHTS)  # what training writes
CHECKPOINT_FILES = ("last.pt", "best.pt", "swa.pt", "snapshot_*.pt", ".*.pt.tmp")  # what training writes in checkpoints/
TENSORBOARD_FILES = "events.out.tfevents.*"


@dataclass(frozen=True)
class RunDir:
    """A run folder: where each of its files lives, and reading and writing them."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunDir":
        """The run a checkpoint file belongs to: ``RUN/checkpoints/NAME.pt`` -> ``RUN``."""
        return cls(Path(checkpoint).parent.parent)

    def __str__(self) -> str:
        return str(self.path)

    # ----------------------------------------------------------- where
    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def taxonomy_file(self) -> Path:
        return self.path / TAXONOMY

    @property
    def normalization_file(self) -> Path:
        """The run's normalisation file; a run written before the file had its name keeps ``stats.json``."""
        legacy = self.path / LEGACY_NORMALIZATION
        current = self.path / NORMALIZATION
        return legacy if legacy.is_file() and not current.is_file() else current

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def summary_file(self) -> Path:
        """``summary.csv``: the per-epoch log as flat columns (see :mod:`herbarium.summary_csv`)."""
        return self.path / SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def o2u_weights(self) -> Path:
        return self.path / O2U_WEIGHTS

    @property
    def rebalance_record(self) -> Path:
        return self.path / REBALANCE_RECORD

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/NAME.pt`` (``last``, ``best``, ``snapshot_2``, ...); a name ending in .pt is kept."""
        return self.checkpoints / (name if name.endswith(".pt") else f"{name}.pt")

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    def eval_dir(self, split: str) -> Path:
        return self.path / "eval" / split

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    def snapshots(self) -> list[Path]:
        """``checkpoints/snapshot_<k>.pt``, by k."""
        found = [(int(m.group(1)), path) for path in self.checkpoints.glob("snapshot_*.pt")
                 if (m := re.fullmatch(r"snapshot_(\d+)\.pt", path.name))]
        return [path for _, path in sorted(found)]

    # ----------------------------------------------------------- what
    def is_run(self) -> bool:
        return self.config_file.is_file()

    def training_markers(self) -> list[str]:
        """The files and folders present that only training writes (a folder holding any of them is a run)."""
        return [name for name in (CONFIG, CHECKPOINTS, LOG) if (self.path / name).exists()]

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir()

    def made_by_a_run(self) -> bool:
        """Whether a run wrote this folder's marker: only then may a new run replace what is in it."""
        return self.marker.is_file()

    def training_outputs(self) -> list[str]:
        """The names present here that training writes (config.json, log.jsonl, checkpoints/, ...)."""
        return [name for name in TRAINING_OUTPUTS if (self.path / name).exists()]

    # ----------------------------------------------------------- write
    def clear_training_outputs(self) -> None:
        """Remove what a previous run in this folder trained (``--overwrite``); evaluations, exports and any other file stay.

        Only the files training writes go (checkpoints by name, TensorBoard
        event files); a folder is removed once nothing else is left in it.
        """
        for pattern in CHECKPOINT_FILES:
            for path in self.checkpoints.glob(pattern):
                path.unlink()
        for path in sorted(self.tensorboard.rglob(TENSORBOARD_FILES)):
            path.unlink()
        folders = sorted((p for p in self.tensorboard.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for folder in [*folders, self.tensorboard, self.checkpoints]:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        for path in (self.log_file, self.summary_file, self.o2u_weights):
            path.unlink(missing_ok=True)

    def write_files(self, cfg: TrainConfig, taxonomy: Taxonomy, normalization: Normalization,
                    train_counts: dict[str, list[int]]) -> None:
        """config.json, taxonomy.json and normalization.json: what the run is, before its first epoch."""
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.save(self.config_file)
        write_atomic(self.taxonomy_file, json.dumps(taxonomy.to_dict()))
        record = {"mean": list(normalization.mean), "std": list(normalization.std), "source": normalization.source,
                  "train_counts": train_counts}
        write_atomic(self.path / NORMALIZATION, json.dumps(record, indent=2))

    def copy_files_to(self, other: "RunDir") -> None:
        """Copy the run files ``other`` lacks, so that a checkpoint written there evaluates like one written here."""
        other.path.mkdir(parents=True, exist_ok=True)
        for source, target in ((self.config_file, other.config_file), (self.taxonomy_file, other.taxonomy_file),
                               (self.normalization_file, other.path / NORMALIZATION)):
            if not target.exists():
                shutil.copy2(source, target)

    # ----------------------------------------------------------- read
    def read_config(self) -> TrainConfig:
        return TrainConfig.load(self.config_file)

    def read_taxonomy(self) -> Taxonomy:
        return Taxonomy.from_dict(json.loads(self.taxonomy_file.read_text()))

    def read_normalization(self) -> dict[str, Any]:
        """``{"mean", "std", "source", "train_counts"}`` as training wrote them."""
        return json.loads(self.normalization_file.read_text())


def evaluation_order(run: RunDir) -> tuple[str, str]:
    """The checkpoints a run folder stands for when evaluated, the first that exists winning.

    ``last.pt`` first: the end of the schedule (a cosine to 0 by default).
    The epoch that scored best on a small validation split is a noisy pick,
    often mid-schedule: at the proxy budget on grocery-store's ``train_lt``
    the best epochs of three seeds were 15, 17 and 27 of 30, and on images
    neither had seen ``last.pt`` scored +0.027 and +0.019 species macro-F1
    above the first two and tied the third (BENCHMARKS.md, "Which
    checkpoint a run stands for"). ``best.pt`` comes first only for a run
    trained with ``--early-stop``, whose last epoch lies past its best by
    design; a run with ``best.pt`` alone (``herbarium rebalance``) stands
    for that.
    """
    early_stopping = run.is_run() and bool(run.read_config().early_stop)
    return ("best", "last") if early_stopping else ("last", "best")


def locate_checkpoint(path: str | Path) -> tuple[Path, RunDir]:
    """(checkpoint file, run) for a run folder (its last.pt, else best.pt; see :func:`evaluation_order`) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        for name in evaluation_order(run):
            if run.checkpoint(name).is_file():
                return run.checkpoint(name), run
        raise FileNotFoundError(f"{path}: no {CHECKPOINTS}/best.pt or {CHECKPOINTS}/last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint file")
    return path, RunDir.of_checkpoint(path)


def evaluated_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint is evaluated with: the moving average of a run with ``--ema-decay``, else the model's."""
    return state.get("ema", state["model"])


def check_checkpoint_classes(state: dict[str, Any], checkpoint: Path, run: RunDir, taxonomy: Taxonomy) -> None:
    """Refuse a checkpoint whose heads were trained on other classes than ``run``'s taxonomy (it was copied from another run).

    Checkpoints written before they carried the fingerprint are taken as they are.
    """
    saved = state.get("taxonomy_fingerprint")
    if saved is None or saved == taxonomy.fingerprint():
        return
    trained_in = state.get("config", {}).get("out") or "another run"
    raise CheckpointError(f"{checkpoint}: trained on other classes (by the run in {trained_in}) than those of the run in "
                          f"{run} it was found in ({run.taxonomy_file} differs); use it with the run folder that trained it")


def model_from_checkpoint(state: dict[str, Any]) -> tuple[nn.Module, TrainConfig]:
    """The trained model a checkpoint holds, rebuilt from the config saved in it (no starting weights fetched).

    A checkpoint of a run with a weight average (``--ema-decay``) gives the average."""
    config = TrainConfig.from_dict(state["config"])
    model_config = replace(config.model, pretrained=False, weights=None)  # the checkpoint holds every weight
    weights = evaluated_weights(state)
    model = build_model(model_config, {rank: int(n) for rank, n in state["classes"].items()},
                        parents_in_state_dict(weights))
    model.load_state_dict(weights)
    return model, config
