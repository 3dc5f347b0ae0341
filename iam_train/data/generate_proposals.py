"""Segment proposals for a dataset that has none: graph-based segmentation (Felzenszwalb and
Huttenlocher, scikit-image) at several scales, plus merges of adjacent segments, written in the
reference proposal format."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .proposals import write_proposals
from .voc import VOCLayout

SCALES = (50, 150, 400, 1000)


def image_proposals(image: np.ndarray, limit: int = 200, min_area: float = 2e-4) -> list[np.ndarray]:
    """(H, W, 3) uint8 -> up to ``limit`` (H, W) bool masks: segments of every scale, then
    unions of adjacent segment pairs; duplicates dropped, larger segments first per kind."""
    from skimage.segmentation import felzenszwalb

    h, w = image.shape[:2]
    small = max(1, int(min_area * h * w))
    seen: set[bytes] = set()
    singles, pairs = [], []
    for scale in SCALES:
        labels = felzenszwalb(image, scale=scale, sigma=0.8, min_size=max(20, small))
        ids, counts = np.unique(labels, return_counts=True)
        for i in ids[np.argsort(-counts)]:
            mask = labels == i
            if small <= mask.sum() <= 0.9 * h * w:
                singles.append(mask)
        # adjacent pairs: labels that touch horizontally or vertically
        touching = set(zip(labels[:, :-1].ravel(), labels[:, 1:].ravel())) | set(zip(labels[:-1].ravel(), labels[1:].ravel()))
        pairs.extend((labels, a, b) for a, b in sorted((a, b) for a, b in touching if a < b))
    out = []
    candidates = itertools.chain(singles, (((lab == a) | (lab == b)) for lab, a, b in pairs))
    for mask in candidates:
        key = np.packbits(mask).tobytes()
        if key not in seen and mask.sum() <= 0.9 * h * w:
            seen.add(key)
            out.append(mask)
        if len(out) >= limit:
            break
    return out


def generate_for_dataset(root: str | Path, split: str | None = None, limit: int = 200,
                         overwrite: bool = False, progress: bool = True) -> tuple[int, list[str]]:
    """Write ImageProposals/<id>.json for every image of ``split`` (all JPEGImages if None).
    Returns (files written, errors) ; unreadable images are reported and skipped."""
    root = Path(root)
    voc = VOCLayout(root) if split else None
    ids = voc.image_ids(split) if voc else sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))
    out_dir = root / "ImageProposals"
    out_dir.mkdir(exist_ok=True)
    written, errors = 0, []
    for image_id in tqdm(ids, desc="proposals", disable=not progress):
        target = out_dir / f"{image_id}.json"
        if target.exists() and not overwrite:
            continue
        path = root / "JPEGImages" / f"{image_id}.jpg"
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        write_proposals(target, image_proposals(rgb, limit))
        written += 1
    return written, errors
