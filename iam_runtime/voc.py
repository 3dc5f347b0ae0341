"""PASCAL VOC constants shared by training data, runtime outputs and evaluation.

Kept in the runtime package because it is the base install (numpy only): the training side
imports it from here so that class order and palette are defined once.
"""

from __future__ import annotations

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

IGNORE_LABEL = 255
"""Value of boundary/ignore pixels in SegmentationClass and SegmentationObject PNGs."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def voc_palette() -> np.ndarray:
    """The standard VOC colour map: (256, 3) uint8, index 0 black, 255 cream."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette
