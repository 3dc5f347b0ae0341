"""Overlay pictures for people to look at: each instance's mask filled translucent and outlined
in its own colour, with a label (class and confidence) placed inside the picture where it covers
no other label. Small images are drawn enlarged so that the labels stay legible; the label size
follows the picture's size."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .segmenter import Instance

MIN_SIDE = 384  # shorter side of the drawn picture at least (small images are enlarged)
FILL_ALPHA = 0.4

# Well-separated, saturated colours (Tableau 10 without its grey), one per instance in turn.
_COLOURS = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                     (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207)], dtype=np.float32)


def instance_colour(k: int) -> tuple[int, int, int]:
    """The colour of the k-th instance (0-based)."""
    return tuple(int(c) for c in _COLOURS[k % len(_COLOURS)])


def _erode(mask: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Pixels whose whole run of 2 * width + 1 along ``axis`` is inside the mask (outside the
    picture counts as outside): running sums, linear in the pixels whatever the width."""
    outside = np.pad(~mask, [(width, width) if a == axis else (0, 0) for a in range(2)], constant_values=True)
    counts = np.cumsum(outside, axis=axis, dtype=np.int32)
    counts = np.concatenate([np.zeros_like(counts.take([0], axis=axis)), counts], axis=axis)
    n = mask.shape[axis]
    window = counts.take(np.arange(2 * width + 1, 2 * width + 1 + n), axis=axis) - counts.take(np.arange(n), axis=axis)
    return window == 0


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within ``width`` of its outside (erosion by a square, separably)."""
    return mask & ~_erode(_erode(mask, width, 0), width, 1)


def _overlaps(box, placed) -> bool:
    return any(box[0] < q[2] and q[0] < box[2] and box[1] < q[3] and q[1] < box[3] for q in placed)


def place_label(anchor_box, size, placed, bounds) -> tuple[int, int]:
    """Top-left of a label of ``size`` (w, h) near ``anchor_box`` (x0, y0, x1, y1): above it, inside
    its top, below it, then further down; inside ``bounds`` (W, H) and clear of ``placed`` where
    any such place exists."""
    (x0, y0, x1, y1), (w, h), (bw, bh) = anchor_box, size, bounds
    clamp = lambda x, y: (min(max(0, x), bw - w), min(max(0, y), bh - h))  # noqa: E731
    candidates = [clamp(x0, y0 - h), clamp(x0, y0), clamp(x0, y1), clamp(x1 - w, y0 - h)]
    candidates += [clamp(x0, y0 + step * h) for step in range(1, bh // max(h, 1) + 1)]
    candidates += [clamp(x0, y0 - step * h) for step in range(1, bh // max(h, 1) + 1)]
    for x, y in candidates:
        if not _overlaps((x, y, x + w, y + h), placed):
            return x, y
    return candidates[0]


def overlay(rgb: np.ndarray, instances: list[Instance], min_side: int = MIN_SIDE) -> Image.Image:
    """rgb (H, W, 3) uint8 and its instances (masks (H, W)) -> the picture, at least ``min_side``
    on its shorter side. Labels read "<class> <confidence>"; the best-scoring instance is drawn
    on top."""
    h, w = rgb.shape[:2]
    scale = max(1.0, min_side / max(1, min(h, w)))
    size = (round(w * scale), round(h * scale))
    base = Image.fromarray(rgb).resize(size, Image.BILINEAR) if scale > 1 else Image.fromarray(rgb)
    picture = np.asarray(base, dtype=np.float32).copy()
    line = max(2, round(min(size) / 200))
    boxes: list[tuple[int, int, int, int] | None] = [None] * len(instances)
    for k, ins in reversed(list(enumerate(instances))):
        mask = ins.mask if scale == 1 else np.asarray(
            Image.fromarray(ins.mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            continue
        boxes[k] = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
        # the work within the mask's bounding box (and the outline's reach around it)
        y0, y1 = max(0, rows[0] - line), min(size[1], rows[-1] + line + 1)
        x0, x1 = max(0, cols[0] - line), min(size[0], cols[-1] + line + 1)
        crop, region = mask[y0:y1, x0:x1], picture[y0:y1, x0:x1]
        colour = _COLOURS[k % len(_COLOURS)]
        region[crop] = (1 - FILL_ALPHA) * region[crop] + FILL_ALPHA * colour
        region[_boundary(crop, line)] = colour
    img = Image.fromarray(picture.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, round(min(size) / 26)))
    pad = max(2, line)
    placed: list[tuple[int, int, int, int]] = []
    for k, (ins, box) in enumerate(zip(instances, boxes)):
        if box is None:
            continue
        text = f"{ins.class_name} {ins.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label = (right - left + 2 * pad, bottom - top + 2 * pad)
        x, y = place_label(box, label, placed, size)
        placed.append((x, y, x + label[0], y + label[1]))
        draw.rectangle(placed[-1], fill=instance_colour(k))
        draw.text((x + pad - left, y + pad - top), text, font=font, fill=(255, 255, 255), stroke_width=1,
                  stroke_fill=(0, 0, 0))
    return img
