"""Overlays people can read (issue 19): labels inside the picture and clear of each other,
masks outlined in their colour, small images drawn large enough to read."""

from __future__ import annotations

import numpy as np

from iam_runtime.overlays import MIN_SIDE, instance_colour, overlay, place_label
from iam_runtime.segmenter import Instance


def _instance(mask, k=0, peak_value=3.0, name="circle"):
    return Instance(k, name, peak_value, 1.0, (0, 0), mask)


def test_labels_stay_inside_and_apart():
    placed = []
    for _ in range(6):  # six labels all anchored at the same box in the top-left corner
        x, y = place_label((0, 0, 30, 20), (50, 14), placed, (200, 120))
        box = (x, y, x + 50, y + 14)
        assert 0 <= box[0] and 0 <= box[1] and box[2] <= 200 and box[3] <= 120
        assert not any(box[0] < q[2] and q[0] < box[2] and box[1] < q[3] and q[1] < box[3] for q in placed)
        placed.append(box)
    x, y = place_label((180, 110, 199, 119), (50, 14), [], (200, 120))  # at the far corner
    assert x + 50 <= 200 and y + 14 <= 120


def test_overlay_outlines_masks_and_enlarges_small_images():
    rgb = np.full((64, 96, 3), 128, np.uint8)
    a = np.zeros((64, 96), bool)
    a[10:40, 10:40] = True
    b = np.zeros((64, 96), bool)
    b[20:60, 50:90] = True
    img = np.asarray(overlay(rgb, [_instance(a, peak_value=4.0), _instance(b, 1, -1.0, "square")]))
    scale = MIN_SIDE / 64
    assert img.shape == (MIN_SIDE, round(96 * scale), 3)
    # the outline of the first mask, on its left edge below any label, is its colour exactly
    y, x = int(35 * scale), int(10 * scale) + 1
    assert tuple(img[y, x]) == instance_colour(0)
    # inside the mask: the photo tinted, not covered
    inner = img[int(30 * scale), int(25 * scale)].astype(int)
    assert 0 < np.abs(inner - 128).max() < 128
    # large photos are drawn at their own size
    assert np.asarray(overlay(np.zeros((600, 800, 3), np.uint8), [])).shape == (600, 800, 3)
