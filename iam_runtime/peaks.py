"""Peak geometry and selection, in numpy (shared with training, which calls these)."""

from __future__ import annotations

import numpy as np


def peak_input_coordinates(coords: np.ndarray, crm_size: tuple[int, int], upsample_factor: int,
                           stride: int = 32) -> np.ndarray:
    """(..., 3) rows (class, y, x) on the upsampled CRM grid -> (..., 2) float (y, x) in input
    pixels. CRM cell j of a torchvision ResNet is centred on input pixel ``stride * j`` (each
    stride-2 layer pads so that output i is centred on input 2i); the sub-pixel grid maps back
    through align_corners=True."""
    coords = np.asarray(coords)
    out = []
    for axis, size in ((1, crm_size[0]), (2, crm_size[1])):
        up = size * upsample_factor
        scale = (size - 1) / (up - 1) if up > 1 else 0.0
        out.append(coords[..., axis].astype(np.float64) * scale * stride)
    return np.stack(out, axis=-1)


def select_peaks(class_scores: np.ndarray, coords: np.ndarray, values: np.ndarray, count: int,
                 class_threshold: float, peak_threshold: float, max_peaks: int) -> np.ndarray:
    """Indices (into the detect outputs of one image) of the peaks to segment: valid, of a class
    whose score is >= class_threshold, with a value > peak_threshold; the highest ``max_peaks``."""
    idx = np.arange(int(count))
    if len(idx) == 0:
        return idx
    cls = coords[idx, 0]
    keep = (class_scores[cls] >= class_threshold) & (values[idx] > peak_threshold)
    return idx[keep][:max_peaks]
