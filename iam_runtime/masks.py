"""Mask overlap and duplicate removal, in numpy: the one implementation that evaluation,
training, the runtime and the benchmarks share."""

from __future__ import annotations

import numpy as np


def mask_ious(a: np.ndarray, b: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W) x (M, H, W) bool -> (N, M) float64 IoU; pixels where ``ignore`` (H, W) is set
    count for neither. Two empty masks have IoU 0 here (see :func:`mask_iou`)."""
    valid = np.ones(a.shape[1:], bool) if ignore is None else ~ignore
    fa = (a & valid).reshape(len(a), -1).astype(np.float64)
    fb = (b & valid).reshape(len(b), -1).astype(np.float64)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def mask_iou(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    """IoU of two (H, W) bool masks; ``empty`` when both are empty (they agree)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else empty


def nms(masks: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float | None) -> np.ndarray:
    """Indices kept by same-class non-maximum suppression over (N, H, W) masks: highest score
    first, a mask overlapping a kept one of its class by IoU > ``iou`` is dropped, and so are
    empty masks. ``iou`` None (or above 1): every index, in order (the reference keeps all)."""
    if iou is None or iou > 1:
        return np.arange(len(masks))
    order = np.argsort(-np.asarray(scores), kind="stable")
    order = order[masks[order].reshape(len(order), -1).any(axis=1)]
    kept: list[int] = []
    for i in order:
        same = [k for k in kept if classes[k] == classes[i]]
        if not same or mask_ious(masks[i : i + 1], masks[same]).max() <= iou:
            kept.append(int(i))
    return np.array(kept, dtype=np.int64)
