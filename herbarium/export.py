"""``herbarium export RUN --format safetensors|torchscript|onnx|export``: a trained model for use outside training.

Every format goes to one folder (default ``RUN/export``) with what is needed
to feed the model and read its output; every file is written readable by
all (0644):

* ``model.safetensors`` + ``heads.safetensors`` + ``config.json``: the
  weights alone (the checkpoint also carries every optimizer's state, about
  3x the size), laid out as a timm model folder:
  ``timm.create_model("local-dir:FOLDER", pretrained=True)`` is the trunk,
  giving the pooled features (see :mod:`herbarium.timm_folder`);
  :func:`load_safetensors` (or ``herbarium.load(FOLDER)``) rebuilds the
  whole model.
* ``model.torchscript.pt``: a traced model, ``torch.jit.load(path)(images)``
  gives ``{rank: logits}``; needs torch only, not herbarium or timm.
* ``model.pt2``: the same through ``torch.export`` (TorchScript's
  successor): ``torch.export.load(path).module()(images)``.
* ``model.onnx``: one output per rank with a head (named as the ranks),
  a dynamic batch axis, the class names and normalisation as metadata;
  needs the optional ``onnx`` package (``pip install 'herbarium-taxa[onnx]'``, or
  ``pip install -e '.[onnx]'`` in a clone),
  and an ONNX runtime to run it.
* ``taxonomy.json``: ranks, class names and category ids in class index order.
* ``preprocessing.json``: input size, resize side, centre crop, mean/std
  and the order of the outputs.

Inputs are float32 RGB in [0, 1], normalised with the mean/std, NCHW:
resize the shorter side to ``resize`` (bilinear, antialiased), centre-crop
``size`` (the evaluation's plain view).
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from herbarium import DISTRIBUTION, timm_folder
from herbarium.arguments import ArgumentParser
from herbarium.cli import prog
from herbarium.config import TrainConfig
from herbarium.errors import HerbariumError, command
from herbarium.data.transforms import DEFAULT_CROP_PCT, resize_size
from herbarium.evaluation.runner import LoadedModel, load_run
from herbarium.run_dir import NORMALIZATION, locate_checkpoint, model_from_checkpoint
from herbarium.taxonomy import Taxonomy

FORMATS = ("safetensors", "torchscript", "onnx", "export")
FILES = {"safetensors": "model.safetensors", "torchscript": "model.torchscript.pt", "onnx": "model.onnx",
         "export": "model.pt2"}
FILE_MODE = 0o644  # an export is for others to read, whatever the umask or temporary-file mode
ONNX_INSTALL = f"pip install '{DISTRIBUTION}[onnx]' (in a clone: pip install -e '.[onnx]')"
ONNX_HINT = f"ONNX export needs the onnx package: {ONNX_INSTALL}, or pip install onnx onnxruntime"


class ExportError(HerbariumError, RuntimeError):
    """An export cannot be made (e.g. a missing optional package)."""


class _TupleOutputs(nn.Module):
    """``{rank: logits}`` as a tuple in a fixed rank order, for exporters that want positional outputs."""

    def __init__(self, model: nn.Module, ranks: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.ranks = tuple(ranks)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(images)
        return tuple(logits[rank] for rank in self.ranks)


def preprocessing(loaded: LoadedModel) -> dict:
    """How to feed the exported model, and the order of its outputs."""
    profile = loaded.profile
    return {
        "size": profile.size,
        "resize": resize_size(profile.size),
        "crop_pct": DEFAULT_CROP_PCT,
        "mean": list(profile.mean),
        "std": list(profile.std),
        "input": "float32 RGB in [0, 1], minus mean, divided by std, NCHW [batch, 3, size, size]",
        "transform": "resize the shorter side to `resize` (bilinear, antialiased), centre-crop `size`",
        "outputs": list(loaded.model.ranks),
        "classes": dict(loaded.model.classes_by_rank),
        "trunk": loaded.config.model.trunk,
        "checkpoint": str(loaded.source),
    }


def example_input(loaded: LoadedModel, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, loaded.profile.size, loaded.profile.size, generator=generator)


def export_safetensors(model: nn.Module, path: Path) -> Path:
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "producer": "herbarium"})
    return path


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; it still loads anywhere torch runs
        traced = torch.jit.trace(model, example, strict=False)  # strict=False: the output is a dict
    traced.save(str(path))
    return path


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``torch.export`` with a dynamic batch axis: ``torch.export.load(path).module()(images)`` -> ``{rank: logits}``."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def onnx_metadata(loaded: LoadedModel) -> dict[str, str]:
    """What an ONNX user needs besides the graph, as the model's metadata (strings, JSON where structured)."""
    taxonomy, ranks = loaded.taxonomy, list(loaded.model.ranks)
    return {
        "ranks": json.dumps(ranks),
        "class_names": json.dumps({rank: taxonomy.names[rank] for rank in ranks}),
        "category_ids": json.dumps([str(category) for category in taxonomy.category_ids]),
        "mean": json.dumps(list(loaded.profile.mean)), "std": json.dumps(list(loaded.profile.std)),
        "size": str(loaded.profile.size), "resize": str(resize_size(loaded.profile.size)),
    }


def export_onnx(model: nn.Module, ranks: Sequence[str], example: torch.Tensor, path: Path, opset: int = 17,
                metadata: dict[str, str] | None = None) -> Path:
    try:
        import onnx
    except ImportError as error:
        raise ExportError(ONNX_HINT) from error
    outputs = list(ranks)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        torch.onnx.export(_TupleOutputs(model, ranks).eval(), (example,), str(path), input_names=["images"],
                          output_names=outputs, dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
                          opset_version=opset, dynamo=False)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, metadata or {})
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))
    return path


def export(run: str | Path, formats: Sequence[str] = ("safetensors",), out: str | Path | None = None) -> dict[str, Path]:
    """Export a run (folder or checkpoint) in each of ``formats``; returns ``{name: path}`` of every file written."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    if "onnx" in formats:
        try:
            import onnx  # noqa: F401  (fail before any file is written)
        except ImportError as error:
            raise ExportError(ONNX_HINT) from error
    loaded = load_run(run, torch.device("cpu"))
    model = loaded.model.float().eval()
    run_folder = locate_checkpoint(run)[1]
    out_dir = Path(out) if out else run_folder.export_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    example = example_input(loaded)
    for name in dict.fromkeys(formats):
        path = out_dir / FILES[name]
        if name == "safetensors":
            written.update(export_weights(loaded, model, out_dir))
        elif name == "torchscript":
            written[name] = export_torchscript(model, example, path)
        elif name == "export":
            written[name] = export_program(model, example, path)
        else:
            written[name] = export_onnx(model, loaded.model.ranks, example, path, metadata=onnx_metadata(loaded))
    (out_dir / "taxonomy.json").write_text(json.dumps(loaded.taxonomy.to_dict()))
    (out_dir / "preprocessing.json").write_text(json.dumps(preprocessing(loaded), indent=2))
    for name in ("taxonomy", "preprocessing"):
        written[name] = out_dir / f"{name}.json"
    if run_folder.normalization_file.is_file():
        written["normalization"] = Path(shutil.copy(run_folder.normalization_file, out_dir / NORMALIZATION))
    for path in written.values():
        path.chmod(FILE_MODE)
    return written


def export_weights(loaded: LoadedModel, model: nn.Module, out_dir: Path) -> dict[str, Path]:
    """The weights as a timm model folder (see :mod:`herbarium.timm_folder`), or whole for a trunk timm cannot rebuild."""
    if not timm_folder.timm_exportable(model):
        loaded.config.save(out_dir / "config.json")
        return {"safetensors": export_safetensors(model, out_dir / FILES["safetensors"]), "config": out_dir / "config.json"}
    names = {rank: loaded.taxonomy.names[rank] for rank in loaded.model.ranks}
    weights, heads, config = timm_folder.write(model, out_dir, loaded.config.to_dict(), names, loaded.profile.size,
                                               loaded.profile.mean, loaded.profile.std, loaded.config.model.pool)
    return {"safetensors": weights, "heads": heads, "config": config}


def is_export_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / FILES["safetensors"]).is_file() and (path / "config.json").is_file()


def load_safetensors(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, Taxonomy, dict]:
    """Rebuild an exported model from ``model.safetensors`` and the ``config.json`` beside it.

    Returns ``(model in eval mode, config, taxonomy, preprocessing)``.
    Nothing is downloaded: the trunk is built without its starting weights,
    which the file replaces.
    """
    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text())
    if timm_folder.is_timm_config(saved):
        config, weights = TrainConfig.from_dict(saved["herbarium"]), timm_folder.merged_state(folder)
    else:  # a trunk timm cannot rebuild, or an export written before the timm layout
        config, weights = TrainConfig.from_dict(saved), load_file(str(folder / FILES["safetensors"]), device="cpu")
    info = json.loads((folder / "preprocessing.json").read_text())
    taxonomy = Taxonomy.from_dict(json.loads((folder / "taxonomy.json").read_text()))
    model, _ = model_from_checkpoint({"config": config.to_dict(), "classes": info["classes"], "model": weights})
    return model.to(device).eval(), config, taxonomy, info


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog("herbarium export"), description="Export a run's model with its taxonomy and "
                                     "normalisation: weights-only safetensors (a timm model folder), traced TorchScript, ONNX or torch.export.")
    parser.add_argument("run", help="run directory (checkpoints/last.pt, else best.pt; best.pt first for an --early-stop run) or a checkpoint file")
    parser.add_argument("--format", default="safetensors",
                        help=f"one or more of {', '.join(FORMATS)}, comma-separated (default: safetensors): safetensors "
                             "a timm model folder (timm.create_model('local-dir:OUT')) with the heads beside it, "
                             "torchscript a traced model, onnx with class names as metadata (needs the optional onnx "
                             f"package: {ONNX_INSTALL}), export a torch.export program (.pt2)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/export)")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    formats = tuple(part.strip() for part in args.format.split(",") if part.strip())
    written = export(args.run, formats, args.out)  # a bad format, run or file: one line (see herbarium.errors)
    width = max(map(len, written))
    for name, path in written.items():
        print(f"{name:<{width}}  {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
