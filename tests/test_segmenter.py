"""The runtime as a library: Segmenter.predict gives iam-infer's masks; the folder pipeline's
scheduling (refinement in this process or in workers, any batch size) gives the same outputs;
NMS and input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from iam_runtime import Segmenter
from iam_runtime.backends import OnnxRuntimeBackend
from iam_runtime.bundle import load_bundle
from iam_runtime.images import decode_image
from iam_runtime.masks import mask_iou, mask_ious, nms
from iam_runtime.pipeline import InferOptions, run

from .conftest import copy_val_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(synthetic, tmp_path_factory):
    return copy_val_images(synthetic, tmp_path_factory.mktemp("segmenter_images"), 6)


def _by_image(predictions: list[dict]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for p in predictions:
        out.setdefault(p["file_name"], []).append((p["category_name"], p["score"], p["segmentation"]["counts"]))
    return out


def test_predict_gives_the_masks_of_iam_infer(trained_bundle, images, tmp_path):
    bundle = load_bundle(trained_bundle)
    backend = OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"])
    run(bundle, backend, images, tmp_path / "out", InferOptions(crf_workers=2, progress=False, save=("json",)))
    folder = _by_image(json.loads((tmp_path / "out" / "predictions.json").read_text()))
    seg = Segmenter.from_bundle(trained_bundle, providers=["CPUExecutionProvider"])
    # the CRF follows the engine's providers, here the CPU's, also where CUDA is present
    assert (seg.refine_settings.crf_backend, seg.refine_settings.crf_providers) == (
        "pydensecrf", ("CPUExecutionProvider",))
    paths = sorted(images.iterdir())
    photos = [decode_image(p) for p in paths]
    found = 0
    for path, rgb, batched in zip(paths, photos, seg.predict_batch(photos)):
        single = seg.predict(rgb)
        assert len(single) == len(batched) == len(folder.get(path.name, []))
        for ins, other, (name, score, counts) in zip(single, batched, folder.get(path.name, [])):
            assert ins.mask.shape == rgb.shape[:2] and ins.mask.dtype == bool
            np.testing.assert_array_equal(ins.mask, other.mask)
            rle = mask_utils.encode(np.asfortranarray(ins.mask.astype(np.uint8)))
            assert (ins.class_name, round(ins.score, 6), rle["counts"].decode()) == (name, score, counts)
            found += 1
    assert found >= 3


@pytest.mark.parametrize("workers,batch", [(1, 1), (2, 1), (2, 4)])
def test_every_schedule_gives_the_same_outputs(trained_bundle, images, tmp_path, workers, batch):
    """Refinement in this process (1 worker) or in worker processes, one image or four per
    engine call: the same predictions, byte for byte."""
    bundle = load_bundle(trained_bundle)
    backend = OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"])
    baseline = tmp_path.parent / "schedule-baseline.json"
    summary = run(bundle, backend, images, tmp_path / "out",
                  InferOptions(crf_workers=workers, batch_size=batch, progress=False, save=("json",)))
    assert summary.completed == 6 and summary.failed == 0
    assert 0 < summary.busy["engine"] <= 1 and 0 < summary.busy["refine"] <= 1
    got = (tmp_path / "out" / "predictions.json").read_text()
    if not baseline.exists():
        baseline.write_text(got)
    assert json.loads(got) == json.loads(baseline.read_text())


def test_nms_keeps_the_best_of_same_class_duplicates():
    masks = np.zeros((5, 10, 10), bool)
    masks[0, :5] = True  # class 0, score 0.9
    masks[1, :4] = True  # class 0, score 0.8: IoU 0.8 with 0 -> dropped at 0.5
    masks[2, :4] = True  # class 1: another class, kept
    masks[3, 6:] = True  # class 0, elsewhere: kept
    scores, classes = np.array([0.9, 0.8, 0.7, 0.6, 0.95]), np.array([0, 0, 1, 0, 0])  # 4: empty, dropped
    assert nms(masks, scores, classes, 0.5).tolist() == [0, 2, 3]
    assert nms(masks, scores, classes, 0.85).tolist() == [0, 1, 2, 3]
    assert nms(masks, scores, classes, None).tolist() == [0, 1, 2, 3, 4]  # the reference: every instance
    assert mask_iou(masks[0], masks[1]) == pytest.approx(0.8)
    assert mask_iou(masks[4], masks[4]) == 1.0 and mask_ious(masks[4:], masks[4:])[0, 0] == 0.0
    ignore = np.zeros((10, 10), bool)
    ignore[4] = True  # the row where the two differ
    assert mask_ious(masks[:1], masks[1:2], ignore)[0, 0] == 1.0


def test_predict_refuses_what_is_not_an_rgb_image(trained_bundle):
    seg = Segmenter.from_bundle(trained_bundle, providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB array, got float32 \(8, 8, 3\)"):
        seg.predict(np.zeros((8, 8, 3), np.float32))
    assert seg.predict_batch([]) == []
