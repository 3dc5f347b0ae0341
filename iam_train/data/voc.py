"""Reading a PASCAL VOC 2012 layout (docs/method.md, section 6): image ids, image-level labels,
instance ground truth and proposals. Plain numpy + Pillow; the torch datasets build on it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from iam_runtime.voc import IGNORE_LABEL

from .proposals import read_proposals

_CLASS_FILE = re.compile(r"^(?P<cls>.+)_(?P<split>[^_]+)\.txt$")


class DatasetError(ValueError):
    """The dataset folder is not usable; the message names the missing or bad path."""


@dataclass(frozen=True)
class Instances:
    """Ground truth of one image. masks: (N, H, W) bool; classes: (N,) int64, 0-based indices
    into the dataset's class list; ignore: (H, W) bool boundary/void pixels (value 255)."""

    masks: np.ndarray
    classes: np.ndarray
    ignore: np.ndarray


class VOCLayout:
    """A dataset folder in the VOC layout.

    Classes are the names of ``ImageSets/Main/<class>_<split>.txt`` files, sorted; for VOC this
    is exactly the 20 VOC classes in their official order (which is alphabetical), so class
    index + 1 is the value used in SegmentationClass.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.main = self.root / "ImageSets" / "Main"
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder not found: {self.root}")
        if not self.main.is_dir():
            raise DatasetError(f"not a VOC layout: {self.main} is missing")
        names = {m["cls"] for f in self.main.iterdir() if (m := _CLASS_FILE.match(f.name))}
        if not names:
            raise DatasetError(f"no <class>_<split>.txt label files in {self.main}")
        self.classes: tuple[str, ...] = tuple(sorted(names))

    def image_ids(self, split: str, segmentation: bool = False) -> list[str]:
        """Ids listed in ImageSets/Main/<split>.txt (or ImageSets/Segmentation/ if asked)."""
        path = self.root / "ImageSets" / ("Segmentation" if segmentation else "Main") / f"{split}.txt"
        if not path.is_file():
            raise DatasetError(f"split file not found: {path}")
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]

    def labels(self, split: str) -> dict[str, np.ndarray]:
        """Image-level labels of a split: id -> (C,) int8 with 1 present, -1 absent, 0 difficult.
        An image missing from a class file counts as absent for that class."""
        ids = self.image_ids(split)
        table = {i: np.full(len(self.classes), -1, dtype=np.int8) for i in ids}
        for c, name in enumerate(self.classes):
            path = self.main / f"{name}_{split}.txt"
            if not path.is_file():
                raise DatasetError(f"label file not found: {path}")
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                    raise DatasetError(f"{path}:{lineno}: expected '<image id> <1|-1|0>', got {line!r}")
                if parts[0] in table:
                    table[parts[0]][c] = int(parts[1])
        return table

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def proposals_path(self, image_id: str) -> Path:
        return self.root / "ImageProposals" / f"{image_id}.json"

    def proposals(self, image_id: str, limit: int | None = None) -> list[np.ndarray]:
        return read_proposals(self.proposals_path(image_id), limit)

    def instances(self, image_id: str) -> Instances:
        """Instance masks from SegmentationObject, each instance's class by majority vote of
        SegmentationClass over its pixels (as the VOC devkit does)."""
        obj_path = self.root / "SegmentationObject" / f"{image_id}.png"
        cls_path = self.root / "SegmentationClass" / f"{image_id}.png"
        for path in (obj_path, cls_path):
            if not path.is_file():
                raise DatasetError(f"ground truth not found: {path}")
        obj = np.asarray(Image.open(obj_path))
        cls = np.asarray(Image.open(cls_path))
        if obj.shape != cls.shape:
            raise DatasetError(f"{obj_path} and {cls_path} differ in size")
        ids = [i for i in np.unique(obj) if i not in (0, IGNORE_LABEL)]
        masks = np.stack([obj == i for i in ids]) if ids else np.zeros((0, *obj.shape), dtype=bool)
        classes = []
        for mask in masks:
            values = cls[mask]
            values = values[(values != 0) & (values != IGNORE_LABEL)]
            if values.size == 0:
                raise DatasetError(f"{cls_path}: an instance of {obj_path} has no class pixels")
            classes.append(int(np.bincount(values).argmax()) - 1)
        return Instances(masks, np.asarray(classes, dtype=np.int64), obj == IGNORE_LABEL)
