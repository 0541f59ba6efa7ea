"""Use a trained run from Python: load it, then predict on your own images.

::

    import herbarium

    run = herbarium.load("runs/se50")            # a run folder (last.pt, else best.pt) or a checkpoint file
    run.model, run.taxonomy, run.transform       # the nn.Module, the label tree, PIL image -> normalised tensor
    run.predict(torch_uint8_images_nchw)         # also PIL images, numpy HWC uint8, normalised float tensors
    run.to("cuda")                               # move it
    for p in run.predict(["sheet1.jpg", "sheet2.jpg"], topk=5):
        print(p.path, p.consistent["species"], p.consistent_probability)
        print(p.top["genus"][:3])                # [(name, probability), ...] best first, from the genus head

The model is rebuilt from the run's ``config.json`` and its checkpoint is
read with ``weights_only=True`` (see :func:`herbarium.evaluation.runner.load_run`).
Predictions use the evaluation's own pieces: its views (``plain`` by
default; ``views="4"`` gives the training TTA), logit averaging and
consistent decoding along the taxonomy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from herbarium.data.images import IMAGE_ERRORS, BadImageError, as_viewed, load_rgb
from herbarium.evaluation.decoding import PathDecoder
from herbarium.evaluation.runner import LoadedModel, load_run, model_outputs
from herbarium.evaluation.submission import top_k_probabilities
from herbarium.evaluation.tta import (
    PLAIN, InputProfile, MultiViewDataset, collate_views, parse_views, view_decode_side, view_transform,
)
from herbarium.export import is_export_folder, load_safetensors
from herbarium.image_inputs import ImageInput, Item, as_inputs, split_inputs
from herbarium.runtime import autocast_dtype, resolve_device
from herbarium.taxonomy import Taxonomy



@dataclass
class Prediction:
    """What the run predicts for one image.

    Attributes:
        path: the image's file (None for an in-memory image, array or tensor).
        index: the image's position in the input.
        top: per rank with a head, coarse to fine: the ``topk`` best
            ``(name, probability)`` pairs of that head, best first.
        consistent: the best valid taxonomy path: ``{rank: name}`` for every
            rank of the taxonomy, coarse to fine (see
            :mod:`herbarium.evaluation.decoding`).
        consistent_probability: that path's share of the softmax over all
            paths' scores.
        category_id: the finest class of the consistent path, as the
            training metadata gives it (what a Kaggle submission wants).
    """

    path: str | None
    index: int
    top: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    consistent: dict[str, str] = field(default_factory=dict)
    consistent_probability: float = float("nan")
    category_id: Any = None


class _ImageList:
    """Paths and PIL images with the ``read_image`` / ``targets`` interface :class:`MultiViewDataset` reads."""

    def __init__(self, images: Sequence[ImageInput], decode_min_side: int | None, skip_bad_images: bool) -> None:
        self.images = list(images)
        self.decode_min_side = decode_min_side
        self.skip_bad_images = skip_bad_images
        self.targets = torch.zeros(len(self.images), 0, dtype=torch.long)  # no labels

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, index: int) -> Image.Image | None:
        image = self.images[index]
        if isinstance(image, Image.Image):
            return as_viewed(image)
        try:
            return load_rgb(image, self.decode_min_side)
        except IMAGE_ERRORS as error:
            if self.skip_bad_images:
                return None
            raise BadImageError(f"cannot read image {image}: {error} (skip such files with skip_bad_images=True, "
                                "--skip-bad-images on the command line)") from error


class Run:
    """A trained run, ready to predict.

    Attributes:
        model: the :class:`~herbarium.models.MultiRankModel` in eval mode on
            ``device``; ``model(images)`` gives ``{rank: logits}`` for
            normalised images [B, 3, size, size].
        taxonomy: ranks, class names and category ids (class index order).
        transform: PIL image -> normalised tensor [3, size, size], the plain
            evaluation view (resize, centre crop, the run's mean/std).
        ranks: the ranks with a head, coarse to fine.
        config: the run's :class:`~herbarium.config.TrainConfig`.
        checkpoint: the checkpoint file that was loaded.
        device: where the model is.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, precision: str = "auto") -> None:
        self.loaded = loaded
        self.model: nn.Module = loaded.model
        self.taxonomy: Taxonomy = loaded.taxonomy
        self.config = loaded.config
        self.profile: InputProfile = loaded.profile
        self.checkpoint: Path = loaded.source
        self.device = device
        self.precision = precision
        self.ranks: tuple[str, ...] = tuple(rank for rank in self.taxonomy.ranks if rank in self.model.ranks)
        self.transform: Callable[[Image.Image], torch.Tensor] = view_transform("plain", self.profile)
        self.decoder = PathDecoder(self.taxonomy)  # consistent decoding along the taxonomy (see decode)

    @property
    def size(self) -> int:
        return self.profile.size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.profile.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.profile.std

    def __repr__(self) -> str:
        classes = ", ".join(f"{rank} {self.taxonomy.num_classes(rank)}" for rank in self.ranks)
        return f"Run({str(self.checkpoint)!r}, trunk={self.config.model.trunk!r}, size={self.size}, heads: {classes}, device={self.device})"

    def batches(self, images: Sequence[ImageInput], views: str | Sequence[str] = "plain", batch_size: int = 32,
                workers: int = 0, seed: int = 0, skip_bad_images: bool = False) -> Iterator[dict[str, Any]]:
        """Batches ``{"views": [Tensor [B, V, 3, H, W]], "index": [B], "skipped": n}`` of ``images``, as evaluation builds them."""
        views = parse_views(views)
        largest = max(view_decode_side(view, self.size) for view in views)
        dataset: Dataset = MultiViewDataset(_ImageList(images, largest, skip_bad_images), views, [self.profile], seed)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_views,
                            pin_memory=self.device.type == "cuda")
        yield from loader

    @torch.inference_mode()
    def log_probs(self, views: torch.Tensor, average: str = "logits") -> dict[str, torch.Tensor]:
        """Views [B, V, 3, H, W] (normalised) -> ``{rank: log-probabilities [B, C]}`` averaged over the views."""
        dtype = autocast_dtype(self.precision, self.device)
        scores, _, _ = model_outputs(self.loaded, views, average, None, self.device, dtype)
        return scores

    def predict(self, images: Any, topk: int = 5, views: str | Sequence[str] = "plain", batch_size: int = 32,
                workers: int = 0, average: str = "logits", seed: int = 0, skip_bad_images: bool = False,
                progress: Callable[[Iterable], Iterable] | None = None) -> list[Prediction]:
        """Predict every image: per-rank top-``topk`` names and probabilities, and the consistent path.

        Args:
            images: one image or several: file paths, PIL images, numpy
                ``uint8`` arrays ``[H, W, 3]`` (or ``[N, H, W, 3]``) and
                ``uint8`` tensors ``[3, H, W]`` (or ``[N, 3, H, W]``) are pixels,
                transformed as the run's evaluation does; floating-point
                tensors ``[3, S, S]`` (or ``[N, 3, S, S]``) are model input,
                already resized to ``run.size`` and normalised with
                ``run.mean``/``run.std`` (what ``run.transform`` returns), fed
                as they are (see :mod:`herbarium.image_inputs`).
            topk: names kept per rank (at most the rank's class count).
            views: TTA views as ``tta_eval.py --views`` takes them: ``"plain"``
                (default), ``"flip"``, ``"4"`` (3 training augmentations +
                plain), ``"multiscale"``, ...; only ``"plain"`` for model input.
            workers: decoding processes (0: in this process).
            skip_bad_images: leave out unreadable files instead of raising
                :class:`~herbarium.data.images.BadImageError`.
            progress: wraps the batch iterator (e.g. ``tqdm``).

        Returns one :class:`Prediction` per readable image, in input order
        (an ``[N, ...]`` array or tensor counts as N images).
        """
        items = as_inputs(images, self.size)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        to_decode, ready = split_inputs(items)
        if ready and parse_views(views) != (PLAIN,):
            raise ValueError(f"views={views!r} needs images to augment; normalised float tensors are fed as they are "
                             "(views='plain'): pass uint8 pixels, PIL images or paths for TTA")
        results: list[Prediction] = []
        batches: Iterable[dict[str, Any]] = self.batches([items[i] for i in to_decode], views, batch_size, workers, seed,
                                                         skip_bad_images)
        for batch in (progress(batches) if progress else batches):
            if "views" not in batch:
                continue
            scores = self.log_probs(batch["views"][0], average)
            results += self._predictions(scores, [to_decode[i] for i in batch["index"].tolist()], items, topk)
        for start in range(0, len(ready), batch_size):
            chunk = ready[start:start + batch_size]
            inputs = torch.stack([items[i] for i in chunk])[:, None]  # [B, 1, 3, S, S]: one view each
            results += self._predictions(self.log_probs(inputs, average), chunk, items, topk)
        return sorted(results, key=lambda prediction: prediction.index)

    def to(self, device: str | torch.device) -> "Run":
        """Move the model to ``device`` (``"cpu"``, ``"cuda:1"``, ``"auto"``) for what follows; returns the run."""
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        return self

    def decode(self, log_probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Consistent decoding: ``{rank: log-probabilities [B, C]}`` -> ``{rank: class index [B]}`` of each image's best
        valid taxonomy path (every rank of the taxonomy), scored as ``tta_eval.py``'s ``consistent`` variants.

        ``run.decode(run.log_probs(views))``; ``run.decoder`` gives the scores of every path too.
        """
        return self.decoder.predictions(log_probs)

    def _predictions(self, scores: dict[str, torch.Tensor], indices: list[int], images: Sequence[Item],
                     topk: int) -> list[Prediction]:
        taxonomy = self.taxonomy
        top = {rank: top_k_probabilities(scores[rank], min(topk, scores[rank].shape[1])) for rank in self.ranks}
        path = self.decode(scores)
        path_probability = torch.softmax(self.decoder.rank_scores(scores)[taxonomy.finest], dim=1)
        finest = path[taxonomy.finest]
        chosen = path_probability.gather(1, finest[:, None])[:, 0]
        out = []
        for row, index in enumerate(indices):
            image = images[index]
            out.append(Prediction(
                path=str(image) if isinstance(image, (str, Path)) else None,
                index=index,
                top={rank: [(taxonomy.names[rank][int(c)], float(p)) for p, c in zip(top[rank][0][row].tolist(), top[rank][1][row].tolist())]
                     for rank in self.ranks},
                consistent={rank: taxonomy.names[rank][int(path[rank][row])] for rank in taxonomy.ranks},
                consistent_probability=float(chosen[row]),
                category_id=taxonomy.category_ids[int(finest[row])],
            ))
        return out


def load(run: str | Path, device: str | torch.device = "auto", precision: str = "auto") -> Run:
    """Load a trained run (a run folder, a checkpoint file, or a ``herbarium export`` folder with
    ``model.safetensors``) for prediction.

    ``device``: ``"auto"`` (CUDA when there is one), ``"cpu"``, ``"cuda:1"``, ...
    ``precision``: autocast precision, ``"auto"`` (bf16 on CUDA, fp32 on the CPU),
    ``"bf16"``, ``"fp16"`` or ``"fp32"``.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    if is_export_folder(run):
        model, config, taxonomy, info = load_safetensors(run, device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        profile = InputProfile(int(info["size"]), tuple(info["mean"]), tuple(info["std"]), config.data.augment)
        return Run(LoadedModel(model, config, taxonomy, profile, {}, Path(run) / "model.safetensors"), device, precision)
    return Run(load_run(run, device), device, precision)
