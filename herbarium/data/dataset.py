"""The Dataset: image tensor plus one target per requested rank."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from herbarium.data.images import IMAGE_ERRORS, BadImageError, load_rgb
from herbarium.data.readers import DatasetSplit
from herbarium.data.sample_table import UNKNOWN, UNLABELLED, category_indices
from herbarium.data.seeding import seeded
from herbarium.taxonomy import TaxonomyError


class ImageDataset(Dataset):
    """Samples of a :class:`DatasetSplit` as ``{"image", "targets", "index"}`` dicts.

    ``targets`` is a LongTensor [len(ranks)] of class indices in rank order,
    ``-1`` where the image has no label. With ``skip_bad_images`` a file that
    cannot be read yields ``None`` (dropped and counted by :func:`collate`);
    otherwise it raises :class:`BadImageError` naming the file and image id.
    """

    def __init__(
        self,
        split: DatasetSplit,
        ranks: Sequence[str],
        transform: Callable[[Any], torch.Tensor],
        *,
        decode_min_side: int | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        self.split = split
        self.ranks = tuple(split.taxonomy.check_rank(rank) for rank in ranks)
        self.transform = transform
        self.decode_min_side = decode_min_side
        self.skip_bad_images = skip_bad_images
        self.targets = self._target_table()

    def _target_table(self) -> torch.Tensor:
        """Targets of every sample up front: LongTensor [N, len(ranks)], in one gather over the taxonomy's table."""
        taxonomy = self.split.taxonomy
        table = taxonomy.path_table(self.ranks)
        indices = torch.from_numpy(category_indices(self.split.samples, taxonomy))
        if (indices == UNKNOWN).any():
            first = self.split.samples[int(torch.nonzero(indices == UNKNOWN)[0])]
            raise TaxonomyError(f"category id {first.category_id!r} of image {first.image_id!r} has no category record")
        targets = torch.full((len(self.split), len(self.ranks)), UNLABELLED, dtype=torch.long)
        labelled = indices >= 0
        targets[labelled] = table[indices[labelled]]
        return targets

    def __len__(self) -> int:
        return len(self.split)

    def read_image(self, index: int):
        sample = self.split.samples[index]
        path = self.split.readable_path(sample)
        try:
            return load_rgb(path, self.decode_min_side)
        except IMAGE_ERRORS as error:
            if self.skip_bad_images:
                return None
            raise BadImageError(
                f"cannot read image {sample.image_id!r} at {path}: {error} "
                "(pass --skip-bad-images to skip and count such files)"
            ) from error

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        """``key`` is an index, or ``(index, augmentation_seed)`` from an :class:`EpochSampler`."""
        index, augmentation_seed = key if isinstance(key, tuple) else (key, None)
        image = self.read_image(index)
        if image is None:
            return None
        if augmentation_seed is None:
            tensor = self.transform(image)
        else:
            with seeded(augmentation_seed):
                tensor = self.transform(image)
        return {"image": tensor, "targets": self.targets[index], "index": index}


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack samples, dropping the ``None`` of skipped bad images and counting them."""
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {"skipped": len(items) - len(kept)}
    if kept:
        batch["image"] = torch.stack([item["image"] for item in kept])
        batch["targets"] = torch.stack([item["targets"] for item in kept])
        batch["index"] = torch.tensor([item["index"] for item in kept], dtype=torch.long)
    return batch
