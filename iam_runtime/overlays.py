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


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within ``width`` of its outside (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


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
    masks = []
    for k, ins in reversed(list(enumerate(instances))):
        mask = ins.mask if scale == 1 else np.asarray(
            Image.fromarray(ins.mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        colour = _COLOURS[k % len(_COLOURS)]
        picture[mask] = (1 - FILL_ALPHA) * picture[mask] + FILL_ALPHA * colour
        picture[_boundary(mask, line)] = colour
        masks.append(mask)
    img = Image.fromarray(picture.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, round(min(size) / 26)))
    pad = max(2, line)
    placed: list[tuple[int, int, int, int]] = []
    for k, (ins, mask) in enumerate(zip(instances, reversed(masks))):
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        text = f"{ins.class_name} {ins.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label = (right - left + 2 * pad, bottom - top + 2 * pad)
        x, y = place_label((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), label, placed, size)
        placed.append((x, y, x + label[0], y + label[1]))
        draw.rectangle(placed[-1], fill=instance_colour(k))
        draw.text((x + pad - left, y + pad - top), text, font=font, fill=(255, 255, 255), stroke_width=1,
                  stroke_fill=(0, 0, 0))
    return img
