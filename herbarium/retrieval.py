"""Classification by similarity to a gallery of labelled embeddings (image retrieval).

The Lotte 1st place and the Google Landmark solutions classify a test image
by the cosine similarity of its L2-normalised embedding to the embeddings of
the training images, instead of (or besides) a softmax head. It helps where
classes have few images and the test images differ from the training ones:
a class is known by its examples, not only by one learned weight vector.
ArcFace training (``--head arcface`` or ``--arcface-levels``) makes the
embedding space angular, which is what cosine retrieval needs.

* The embedding is the model's ``forward_features`` (the pooled trunk
  features, or the ``--embedding-dim`` layer), L2-normalised; gallery images
  are embedded with flip TTA (plain and mirrored, averaged, renormalised).
* ``centroid`` mode: the similarity of an image to class c is the cosine to
  the normalised mean embedding of c's gallery images. A class without
  gallery images gets similarity -1, the lowest a cosine can be.
* ``knn`` mode: the image's k most similar gallery images vote for their
  classes with their cosine: score_c = (1/k) * sum of the similarities of
  the neighbours of class c (0 for a class with none among them).
* Scores become log-probabilities with ``log_softmax(scale * score)``
  (``scale`` plays the part of ArcFace's scale) and are mixed with the heads'
  log-probabilities: ``(1 - w) * heads + w * retrieval``, renormalised.
* Several models (k-fold, an ensemble): each model has its own gallery and
  embedding space, so their *similarities* are averaged, which is the cosine
  between the concatenations of the models' normalised embeddings, divided
  by the number of models. Averaging embeddings of separately trained models
  would mix unrelated coordinates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

RETRIEVAL_MODES = ("centroid", "knn")

# A gallery may take this share of the memory free where it would be kept; past it, float16, then the host.
GALLERY_MEMORY_SHARE = 0.25


def normalised_view_mean(features: torch.Tensor) -> torch.Tensor:
    """Features of V views [B, V, D] -> one unit embedding per image [B, D] (the views' unit vectors averaged)."""
    return F.normalize(F.normalize(features.float(), dim=-1).mean(dim=1), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """Unit embeddings [B, D] of images given as views [B, V, 3, H, W]: the views' unit features averaged."""
    features = model.forward_features(views.flatten(0, 1))  # [B*V, D]
    return normalised_view_mean(features.view(len(views), views.shape[1], -1))


def class_centroids(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit mean embedding per class [C, D], class has gallery images [C]); labels < 0 are skipped.

    Summed in float32 a block of rows at a time, so a float16 gallery of
    millions of images is never copied whole.
    """
    labels = labels.to(embeddings.device)
    labelled = labels >= 0
    sums = torch.zeros(num_classes, embeddings.shape[1], dtype=torch.float32, device=embeddings.device)
    for rows in _row_blocks(len(embeddings), embeddings.shape[1]):
        keep = labelled[rows]
        sums.index_add_(0, labels[rows][keep], embeddings[rows][keep].float())
    present = torch.bincount(labels[labelled], minlength=num_classes) > 0
    return F.normalize(sums, dim=1), present


SEARCH_BLOCK_ELEMENTS = 2**24  # gallery entries (rows x embedding size) compared with the queries at once


def _row_blocks(rows: int, width: int, elements: int = SEARCH_BLOCK_ELEMENTS) -> list[slice]:
    step = max(1, elements // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def centroid_similarity(queries: torch.Tensor, centroids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Cosine of unit queries [Q, D] to unit class centroids [C, D] -> [Q, C]; -1 for classes without images."""
    similarity = queries.float() @ centroids.t()  # [Q, C]
    return similarity.masked_fill(~present, -1.0)


def nearest(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines [Q, k] and indices [Q, k] of the k gallery embeddings [N, D] nearest to unit queries [Q, D].

    The gallery may sit on another device (the host) or in float16: it is
    compared a block of rows at a time, each block moved to the queries'
    device and widened to float32 there, keeping the best k so far.
    """
    if k < 1:
        raise ValueError(f"retrieval k must be >= 1, got {k}")
    queries = queries.float()
    best_similarity = torch.empty(len(queries), 0, device=queries.device)
    best_index = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    for rows in _row_blocks(len(gallery), gallery.shape[1]):
        block = gallery[rows].to(queries.device, non_blocking=True).float()
        top = (queries @ block.t()).topk(min(k, len(block)), dim=1)  # [Q, k] of this block
        candidates = torch.cat([best_similarity, top.values], dim=1)
        candidate_index = torch.cat([best_index, top.indices + rows.start], dim=1)
        best_similarity, order = candidates.topk(min(k, candidates.shape[1]), dim=1)
        best_index = candidate_index.gather(1, order)
    return best_similarity, best_index


def knn_votes(top_similarity: torch.Tensor, top_labels: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """Similarity-weighted vote of the neighbours [Q, k]: [Q, C], (1/k) * sum of each class's neighbours' cosines.

    Neighbours without a label at this rank (-1) do not vote.
    """
    labelled = top_labels >= 0
    votes = torch.zeros(len(top_labels), num_classes, dtype=torch.float32, device=top_labels.device)
    votes.scatter_add_(1, top_labels.clamp_min(0), top_similarity.float() * labelled)
    return votes / k


def knn_similarity(queries: torch.Tensor, gallery: torch.Tensor, gallery_labels: torch.Tensor, num_classes: int,
                   k: int) -> torch.Tensor:
    """The k-nearest-neighbour vote [Q, C] of unit queries [Q, D] in a labelled gallery [N, D]."""
    top_similarity, top_index = nearest(queries, gallery, k)
    return knn_votes(top_similarity, gallery_labels[top_index], num_classes, k)


@dataclass(frozen=True)
class GalleryPlacement:
    """Where a gallery's embeddings are kept and in which precision, and why (:func:`gallery_placement`)."""

    device: torch.device
    dtype: torch.dtype
    reason: str


def gallery_placement(images: int, dim: int, device: torch.device, free: dict[str, int] | None = None) -> GalleryPlacement:
    """Keep ``images`` embeddings of ``dim`` on ``device`` in float32 if they take at most
    :data:`GALLERY_MEMORY_SHARE` of its free memory, else in float16, else on the host in
    float16 (searched a block at a time from ``device``).

    At Herbarium 2021 size (2.26M images, 1024 features) float32 takes 9.2 GB,
    more than a quarter of many GPUs; cosines of unit vectors lose nothing
    that matters in float16 (3 significant digits, widened to float32 to compare).
    ``free`` (bytes free by device type) replaces the measured figures, for tests.
    """
    device = torch.device(device)
    free = free or {}
    need = images * dim * 4  # bytes in float32
    candidates = [(device, torch.float32), (device, torch.float16)]
    if device.type != "cpu":
        candidates.append((torch.device("cpu"), torch.float16))
    for place, dtype in candidates:
        available = free[place.type] if place.type in free else _free_bytes(place)
        limit = GALLERY_MEMORY_SHARE * available
        size = need // 4 * torch.empty((), dtype=dtype).element_size()
        if size <= limit or (place, dtype) == candidates[-1]:
            fits = "within" if size <= limit else "over, as nowhere has room"
            reason = (f"{images:,} x {dim} embeddings take {size / 1e9:.2f} GB in {str(dtype).removeprefix('torch.')}, "
                      f"{fits} {GALLERY_MEMORY_SHARE:.0%} of the {available / 1e9:.1f} GB free on {place} "
                      f"({need / 1e9:.2f} GB in float32)")
            return GalleryPlacement(place, dtype, reason)
    raise AssertionError("unreachable: the last candidate is always taken")


def _free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: the CUDA allocator's figure, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Gallery:
    """One model's gallery: unit embeddings [N, D] and labels per rank ``{rank: [N]}`` (-1: unlabelled)."""

    embeddings: torch.Tensor
    labels: dict[str, torch.Tensor]
    num_classes: dict[str, int]

    def __post_init__(self) -> None:
        self.centroids = {rank: class_centroids(self.embeddings, labels, self.num_classes[rank])
                          for rank, labels in self.labels.items()}
        self._on_device: dict[torch.device, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def centroids_on(self, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The class centroids on ``device`` (copied there once: a gallery kept on the host is searched from the GPU)."""
        if device not in self._on_device:
            self._on_device[device] = {rank: (centroids.to(device), present.to(device))
                                       for rank, (centroids, present) in self.centroids.items()}
        return self._on_device[device]

    def to(self, device: torch.device) -> "Gallery":
        return Gallery(self.embeddings.to(device), {r: v.to(device) for r, v in self.labels.items()}, self.num_classes)

    def similarities(self, queries: torch.Tensor, mode: str = "centroid", k: int = 5) -> dict[str, torch.Tensor]:
        """Class similarities ``{rank: [Q, C]}`` of unit queries [Q, D] (one neighbour search for every rank)."""
        if mode == "centroid":
            return {rank: centroid_similarity(queries, *self.centroids_on(queries.device)[rank]) for rank in self.labels}
        if mode == "knn":
            top_similarity, top_index = nearest(queries, self.embeddings, k)
            return {rank: knn_votes(top_similarity, labels.to(top_index.device)[top_index], self.num_classes[rank], k)
                    for rank, labels in self.labels.items()}
        raise ValueError(f"unknown retrieval mode {mode!r}; choose one of {list(RETRIEVAL_MODES)}")


def retrieval_log_probs(galleries: Sequence[Gallery], queries: Sequence[torch.Tensor], mode: str, k: int,
                        scale: float) -> dict[str, torch.Tensor]:
    """Per rank, ``log_softmax(scale * mean over models of the class similarities)`` [Q, C].

    ``queries[m]`` are the unit embeddings [Q, D_m] of the same images by
    model m, compared with ``galleries[m]``. A rank some galleries lack is
    averaged over those that have it.
    """
    if len(galleries) != len(queries) or not galleries:
        raise ValueError(f"need one query embedding per gallery, got {len(queries)} for {len(galleries)}")
    per_model = [gallery.similarities(query, mode, k) for gallery, query in zip(galleries, queries)]
    ranks = list(dict.fromkeys(rank for similarities in per_model for rank in similarities))
    scores = {}
    for rank in ranks:
        similarity = torch.stack([s[rank] for s in per_model if rank in s]).mean(dim=0)  # [Q, C]
        scores[rank] = torch.log_softmax(scale * similarity, dim=1)
    return scores


def mix_log_probs(heads: Mapping[str, torch.Tensor], retrieval: Mapping[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """``log_softmax((1 - weight) * heads + weight * retrieval)`` per rank; ranks only one side has pass through."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"retrieval weight must be in [0, 1], got {weight}")
    mixed = {}
    for rank in dict.fromkeys([*heads, *retrieval]):
        if rank in heads and rank in retrieval:
            mixed[rank] = torch.log_softmax((1.0 - weight) * heads[rank] + weight * retrieval[rank], dim=1)
        else:
            mixed[rank] = heads[rank] if rank in heads else retrieval[rank]
    return mixed
