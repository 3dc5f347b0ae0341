"""The CRF stage alone: the reference's one DenseCRF per instance against the runtime's
refinement, on object-shaped maps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from iam_runtime.images import decode_image
from iam_runtime.masks import mask_iou
from iam_runtime.refine import CRFSchedule, dense_crf
from iam_runtime.segmenter import RefineSettings


def object_shaped_maps(rgb: np.ndarray, count: int) -> list[np.ndarray]:
    """Up to ``count`` (H, W) activation maps shaped like a trained filling network's, for the CRF
    comparison: the photo's largest graph-based segments of 2 to 40 % of its area, blurred
    (sigma 2 % of the diagonal) and scaled into [0.05, 0.95]. Random weights give near-uniform
    maps that the CRF mostly erases, and on those a mask IoU says little."""
    from scipy.ndimage import gaussian_filter
    from skimage.segmentation import felzenszwalb

    h, w = rgb.shape[:2]
    labels = felzenszwalb(rgb, scale=1000, sigma=0.8, min_size=max(20, int(0.01 * h * w)))
    ids, counts = np.unique(labels, return_counts=True)
    chosen = [i for i, c in sorted(zip(ids, counts), key=lambda ic: -ic[1]) if 0.02 * h * w <= c <= 0.4 * h * w]
    maps = []
    for i in chosen[:count]:
        blurred = gaussian_filter((labels == i).astype(np.float32), 0.02 * float(np.hypot(h, w)))
        maps.append((0.05 + 0.9 * blurred / blurred.max()).astype(np.float32))
    return maps


def crf_on_object_maps(photos: list[Path], count: int, crf, workers: int, max_side: int) -> dict:
    """The CRF stage alone on object-shaped maps (:func:`object_shaped_maps`): the reference
    (one full-resolution DenseCRF per instance, one process) against the runtime's refinement
    (the Segmenter's refine stage: one CRF per image for all its instances, whole images spread over
    ``workers`` processes, as iam-infer does between engine calls on the CPU) at full resolution,
    at ``max_side`` with the last iteration at full resolution (iam-infer --crf-max-side), and
    at ``max_side`` throughout. Per-instance times are wall seconds; IoU against the reference's
    masks."""
    from concurrent.futures import ProcessPoolExecutor

    from iam_runtime.pipeline import _worker_context

    images = []
    for path in photos:
        rgb = decode_image(path)
        if maps := object_shaped_maps(rgb, count):
            images.append((rgb, np.stack(maps)))
    if not images:
        return {"instances": 0, "images": 0}
    reference, times = [], []
    for rgb, maps in images:
        for m in maps:
            t0 = time.perf_counter()
            reference.append(dense_crf(rgb, m, crf))
            times.append(time.perf_counter() - t0)
    instances = len(reference)
    result = {"instances": instances, "images": len(images), "reference_per_instance_s": float(np.mean(times)),
              "runtime_workers": workers}
    with ProcessPoolExecutor(workers, mp_context=_worker_context()) as pool:
        full = RefineSettings("crf", crf, 0.5, CRFSchedule())
        warm = [pool.submit(full.refine, rgb, maps[:1]) for rgb, maps in images[:1] * workers]
        [job.result() for job in warm]  # the workers started, pydensecrf imported
        for key, schedule in (("runtime_full_resolution", CRFSchedule()),
                              (f"runtime_max_side_{max_side}", CRFSchedule(max_side)),
                              (f"runtime_max_side_{max_side}_coarse_only", CRFSchedule(max_side, full_iterations=0))):
            t0 = time.perf_counter()
            settings = RefineSettings("crf", crf, 0.5, schedule)  # the Segmenter's refine stage
            jobs = [pool.submit(settings.refine, rgb, maps) for rgb, maps in images]
            masks = [m for job in jobs for m in job.result()]
            per_instance = (time.perf_counter() - t0) / max(instances, 1)
            ious = [mask_iou(a, b) for a, b in zip(reference, masks)]
            result[key] = {"per_instance_s": per_instance, "speedup": result["reference_per_instance_s"] / per_instance,
                           "mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious))}
    return result
