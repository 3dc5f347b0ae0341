"""Torch datasets over a VOC layout: images for classification, images + proposals for
filling. Randomness (flips) is derived from (seed, epoch, index), so any worker count, and a
resumed run, sees the same samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from iam_runtime.images import ImageError, decode_image, preprocess
from iam_runtime.voc import IMAGENET_MEAN, IMAGENET_STD

from .proposals import ProposalError
from .voc import DatasetError, VOCLayout

log = logging.getLogger(__name__)


def load_image(path, size: int) -> Tensor:
    """RGB image stretched to (size, size), ImageNet-normalised: (3, size, size) float32 (the
    runtime's preprocessing, so that training and inference see the same pixels)."""
    return torch.from_numpy(preprocess(decode_image(path), (size, size), IMAGENET_MEAN, IMAGENET_STD))


def _flip_decision(seed: int, epoch: int, index: int, p: float) -> bool:
    return bool(np.random.default_rng([seed, epoch, index]).random() < p)


class _VOCBase(Dataset):
    def __init__(self, root, split: str, image_size: int, flip: float = 0.0, seed: int = 0):
        self.voc = VOCLayout(root)
        self.image_size, self.flip, self.seed, self.epoch = image_size, flip, seed, 0
        ids = self.voc.image_ids(split)
        missing = [i for i in ids if not self.voc.image_path(i).is_file()]
        if missing:
            log.warning("%d listed images are missing and skipped, e.g. %s", len(missing),
                        ", ".join(str(self.voc.image_path(i)) for i in missing[:3]))
        skipped = set(missing)
        self.ids = [i for i in ids if i not in skipped]
        self.skipped = list(missing)
        if not self.ids:
            raise DatasetError(f"split {split!r} of {root} lists no readable images")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def _image(self, index: int) -> tuple[Tensor, bool] | None:
        path = self.voc.image_path(self.ids[index])
        try:
            image = load_image(path, self.image_size)
        except (OSError, ImageError) as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            return None
        flipped = self.flip > 0 and _flip_decision(self.seed, self.epoch, index, self.flip)
        return (image.flip(-1) if flipped else image), flipped


class ClassificationDataset(_VOCBase):
    """Items: (image (3, S, S), target (C,) float with difficult counted as positive, as the
    reference does, the item's index), or None for an unreadable image (dropped by
    :func:`collate_skip`): whatever is dropped, scores stay with their images' labels."""

    def __init__(self, root, split: str, image_size: int, flip: float = 0.0, seed: int = 0):
        super().__init__(root, split, image_size, flip, seed)
        labels = self.voc.labels(split)
        self.labels = np.stack([labels[i] for i in self.ids])

    def __getitem__(self, index: int):
        loaded = self._image(index)
        if loaded is None:
            return None
        return loaded[0], torch.from_numpy((self.labels[index] >= 0).astype(np.float32)), index


@dataclass
class FillingItem:
    image: Tensor  # (3, S, S)
    labels: Tensor  # (C,) int8 image-level labels (1, -1, 0)
    proposals: Tensor  # (N, S, S) bool, the usable proposals resized to the input
    index: int


class FillingDataset(_VOCBase):
    """Items: :class:`FillingItem` with the first ``max_proposals`` proposals whose area lies in
    [min_area, max_area] of the image (docs/method.md, section 3), or None when the image or its proposal
    file cannot be read."""

    def __init__(self, root, split: str, image_size: int, max_proposals: int = 100,
                 min_area: float = 2e-5, max_area: float = 0.85, flip: float = 0.0, seed: int = 0):
        super().__init__(root, split, image_size, flip, seed)
        labels = self.voc.labels(split)
        self.labels = np.stack([labels[i] for i in self.ids])
        self.max_proposals, self.min_area, self.max_area = max_proposals, min_area, max_area

    def __getitem__(self, index: int):
        loaded = self._image(index)
        if loaded is None:
            return None
        image, flipped = loaded
        try:
            masks = self.voc.proposals(self.ids[index], limit=self.max_proposals)
        except (ProposalError, FileNotFoundError) as exc:
            log.warning("skipping %s: %s", self.ids[index], exc)
            return None
        kept = [m for m in masks if self.min_area <= m.mean() <= self.max_area]
        s = self.image_size
        resized = [np.asarray(Image.fromarray(m).resize((s, s), Image.NEAREST)) for m in kept]
        props = torch.from_numpy(np.stack(resized)) if resized else torch.zeros((0, s, s), dtype=torch.bool)
        if flipped:
            props = props.flip(-1)
        return FillingItem(image, torch.from_numpy(self.labels[index]), props, index)


def collate_skip(batch):
    """Default collation after dropping unreadable items (None); FillingItems stay a list."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    if isinstance(batch[0], FillingItem):
        return batch
    return torch.utils.data.default_collate(batch)
