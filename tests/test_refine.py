"""Dense CRF refinement: one CRF per image (its pairwise lattices built once) gives each
instance the mask of a CRF built for it alone, bit for bit (real pydensecrf, a real photo)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from iam_runtime.bundle import CRFSpec
from iam_runtime.refine import CRFSchedule, dense_crf, refine_instances, resize_map


@pytest.fixture(scope="module")
def photo_and_maps():
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((200, 150)))
    # smooth activation maps at network resolution (28 x 28), a blob each at a different place
    yy, xx = np.mgrid[:28, :28]
    maps = np.stack([np.clip(1.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2)), 0, 0.99)
                     for cy, cx in ((8, 8), (14, 20), (20, 10), (5, 22))]).astype(np.float32)
    return rgb, maps


@pytest.mark.parametrize("max_side", [0, 120])
def test_one_crf_per_image_equals_one_per_instance(photo_and_maps, max_side):
    rgb, maps = photo_and_maps
    crf = CRFSpec()
    together = refine_instances(rgb, maps, "crf", crf, schedule=CRFSchedule(max_side))
    alone = np.stack([dense_crf(rgb, resize_map(m, rgb.shape[:2]), crf, CRFSchedule(max_side)) for m in maps])
    assert together.shape == (4, 150, 200) and together.dtype == bool
    np.testing.assert_array_equal(together, alone)
    # each instance got its own mask: non-empty, not the whole image, different from the others
    fractions = together.mean(axis=(1, 2))
    assert ((fractions > 0.005) & (fractions < 0.6)).all(), fractions
    assert len({m.tobytes() for m in together}) == 4


def test_threshold_refinement_needs_no_crf(photo_and_maps):
    rgb, maps = photo_and_maps
    masks = refine_instances(rgb, maps, "threshold", CRFSpec(), threshold=0.5)
    assert masks.shape == (4, 150, 200) and 0 < masks.mean() < 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_coarse_to_fine_crf_stays_close_to_full_resolution(photo_and_maps):
    """Reduced resolution for all but the last iteration: masks near the full-resolution CRF's
    (the reference's), nearer than a CRF at reduced resolution throughout."""
    rgb, maps = photo_and_maps
    crf = CRFSpec()
    full = refine_instances(rgb, maps, "crf", crf)
    coarse_to_fine = refine_instances(rgb, maps, "crf", crf, schedule=CRFSchedule(max_side=100))
    coarse_only = refine_instances(rgb, maps, "crf", crf, schedule=CRFSchedule(max_side=100, full_iterations=0))
    near = [_iou(a, b) for a, b in zip(full, coarse_to_fine)]
    far = [_iou(a, b) for a, b in zip(full, coarse_only)]
    assert min(near) >= 0.9 and np.mean(near) >= np.mean(far), (near, far)
    # every iteration at full resolution is the full-resolution CRF itself
    np.testing.assert_array_equal(refine_instances(rgb, maps, "crf", crf, schedule=CRFSchedule(100, 5)), full)


def test_crf_schedule_rejects_negative_values():
    with pytest.raises(ValueError, match="must be >= 0"):
        CRFSchedule(max_side=-1)
