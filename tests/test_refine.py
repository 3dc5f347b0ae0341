"""Dense CRF refinement (real pydensecrf, a real photo): one CRF per image (its pairwise
lattices built once) gives each instance the mask of a CRF built for it alone, bit for bit with
the per-instance mean-field and within rounding with an image's instances together; the CRF
frame (the reference's: the network's input size) and the reference's unary."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from iam_runtime.bundle import CRFSpec
from iam_runtime.images import resize_rgb
from iam_runtime.masks import mask_iou
from iam_runtime.refine import (
    JOINT_INSTANCES,
    CRFSchedule,
    crf_frame,
    crf_margins,
    dense_crf,
    reference_unary,
    refine_instances,
    resize_map,
)


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
    crf = CRFSpec(frame="image")
    schedule = CRFSchedule(max_side, per_instance=True)
    together = refine_instances(rgb, maps, "crf", crf, schedule=schedule)
    alone = np.stack([dense_crf(rgb, resize_map(m, rgb.shape[:2]), crf, CRFSchedule(max_side)) for m in maps])
    assert together.shape == (4, 150, 200) and together.dtype == bool
    np.testing.assert_array_equal(together, alone)
    # each instance got its own mask: non-empty, not the whole image, different from the others
    fractions = together.mean(axis=(1, 2))
    assert ((fractions > 0.005) & (fractions < 0.6)).all(), fractions
    assert len({m.tobytes() for m in together}) == 4


@pytest.mark.parametrize("max_side", [0, 120])
def test_instances_filtered_together_agree_with_pydensecrfs_own_mean_field(photo_and_maps, max_side):
    """The default: an image's instances through its lattices at once (one channel each, q(bg) =
    1 - q(fg)), more of them than one pass takes. The refined probabilities agree with pydensecrf's
    per-instance mean-field within rounding, so the masks do wherever the margin is not a tie."""
    rgb, maps = photo_and_maps
    crf = CRFSpec(frame="image")
    # more instances than one pass holds: the four blobs, each also shifted and flattened
    probs = np.stack([resize_map(m, rgb.shape[:2]) for m in maps])
    probs = np.concatenate([np.roll(probs, 9 * i, axis=2) * (1 - 0.04 * i) + 0.02 * i for i in range(5)])
    assert len(probs) > JOINT_INSTANCES
    joint = crf_margins(rgb, probs, crf, "pydensecrf", CRFSchedule(max_side))
    alone = crf_margins(rgb, probs, crf, "pydensecrf", CRFSchedule(max_side, per_instance=True))
    assert joint.shape == alone.shape == probs.shape and joint.dtype == np.float32
    np.testing.assert_allclose(joint, alone, atol=1e-3)
    decided = np.abs(alone) > 1e-3
    np.testing.assert_array_equal((joint > 0)[decided], (alone > 0)[decided])
    assert decided.mean() > 0.999
    # each instance its own: a changed map changes only its own margins
    other = probs.copy()
    other[3] = 1 - other[3]
    changed = crf_margins(rgb, other, crf, "pydensecrf", CRFSchedule(max_side))
    np.testing.assert_array_equal(np.delete(changed, 3, axis=0), np.delete(joint, 3, axis=0))
    assert np.abs(changed[3] - joint[3]).max() > 0.5


def test_threshold_refinement_needs_no_crf(photo_and_maps):
    rgb, maps = photo_and_maps
    masks = refine_instances(rgb, maps, "threshold", CRFSpec(), threshold=0.5)
    assert masks.shape == (4, 150, 200) and 0 < masks.mean() < 0.5




def test_coarse_to_fine_crf_stays_close_to_full_resolution(photo_and_maps):
    """Reduced resolution for all but the last iteration: masks near the full-resolution CRF's
    (the reference's), nearer than a CRF at reduced resolution throughout."""
    rgb, maps = photo_and_maps
    crf = CRFSpec(frame="image")
    full = refine_instances(rgb, maps, "crf", crf)
    coarse_to_fine = refine_instances(rgb, maps, "crf", crf, schedule=CRFSchedule(max_side=100))
    coarse_only = refine_instances(rgb, maps, "crf", crf, schedule=CRFSchedule(max_side=100, full_iterations=0))
    near = [mask_iou(a, b) for a, b in zip(full, coarse_to_fine)]
    far = [mask_iou(a, b) for a, b in zip(full, coarse_only)]
    assert min(near) >= 0.9 and np.mean(near) >= np.mean(far), (near, far)
    # every iteration at full resolution is the full-resolution CRF itself
    np.testing.assert_array_equal(refine_instances(rgb, maps, "crf", crf, schedule=CRFSchedule(100, 5)), full)


def test_crf_schedule_rejects_negative_values():
    with pytest.raises(ValueError, match="must be >= 0"):
        CRFSchedule(max_side=-1)


def test_crf_in_the_input_frame_is_the_reference_crf_brought_to_the_photo(photo_and_maps):
    """Frame "input": the CRF runs on the photo resized to the maps' size (the reference's 448
    frame) with the maps as they are; the photo-size masks are its refined probabilities resized."""
    rgb, maps = photo_and_maps
    maps = np.stack([resize_map(m, (112, 112)) for m in maps])  # the network's input size
    crf = CRFSpec()
    assert crf.frame == "input"
    frame, scale = crf_frame(rgb, maps.shape[1:], crf)
    assert frame.shape == (112, 112, 3) and scale == 1.0
    np.testing.assert_array_equal(frame, resize_rgb(rgb, (112, 112)))
    in_frame = np.stack([dense_crf(frame, m, crf) for m in maps])  # the reference's computation
    # a photo of the frame's size: exactly the reference's masks
    np.testing.assert_array_equal(refine_instances(frame, maps, "crf", crf, schedule=CRFSchedule(per_instance=True)),
                                  in_frame)
    # any other photo size: the frame's masks scaled, and the frame does not grow with the photo
    masks = refine_instances(rgb, maps, "crf", crf)
    assert masks.shape == (4, 150, 200)
    for mask, ref in zip(masks, in_frame):
        scaled = np.asarray(Image.fromarray(ref).resize((200, 150), Image.NEAREST))
        assert mask_iou(mask, scaled) > 0.9
    big = np.asarray(Image.fromarray(rgb).resize((2000, 1500)))
    assert crf_frame(big, maps.shape[1:], crf)[0].shape == (112, 112, 3)


def test_photo_frame_is_capped_with_kernel_widths_scaled():
    big = np.zeros((1500, 3000, 3), np.uint8)
    frame, scale = crf_frame(big, (112, 112), CRFSpec(frame="image"), CRFSchedule(photo_max_side=1024))
    assert frame.shape == (512, 1024, 3) and scale == 1024 / 3000
    frame, scale = crf_frame(big, (112, 112), CRFSpec(frame="image"), CRFSchedule(photo_max_side=0))
    assert frame.shape == big.shape and scale == 1.0


def test_unary_is_the_reference_one():
    """-log([1 - p, p]) with exact zeros replaced by 1e-10 (not clipped), and p above 1 from an
    engine's rounding clipped to 1 rather than turned into NaN."""
    p = np.array([[0.0, 0.25, 1.0, 1.0000001]], np.float32)
    unary = reference_unary(p)
    expected = -np.log(np.array([[1.0, 0.75, 1e-10, 1e-10], [1e-10, 0.25, 1.0, 1.0]], np.float32))
    np.testing.assert_allclose(unary, expected, rtol=1e-6)
    assert np.isfinite(unary).all()
