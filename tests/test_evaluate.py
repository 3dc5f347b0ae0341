"""iam-eval: mAP^r and ABO on hand-built cases, computed by hand here (issue 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from iam_runtime.masks import mask_ious
from iam_train.evaluate import EvaluationError, average_precision, evaluate, main

CLASSES = ["circle", "square"]


def box(y0, x0, y1, x1, size=20):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def pred(image_id, mask, cls, score):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return {"image_id": image_id, "category_id": cls + 1, "category_name": CLASSES[cls], "score": score,
            "segmentation": rle}


A, B, C = box(0, 0, 10, 10), box(10, 10, 20, 20), box(0, 10, 8, 20)
GT = {"img1": (np.stack([A, B]), np.array([0, 0]), np.zeros((20, 20), bool)),
      "img2": (np.stack([C]), np.array([1]), np.zeros((20, 20), bool))}


def test_perfect_predictions():
    r = evaluate([pred("img1", A, 0, 0.9), pred("img1", B, 0, 0.8), pred("img2", C, 1, 0.7)], GT, CLASSES)
    assert r["mAP_r"] == {"0.25": 1.0, "0.5": 1.0, "0.75": 1.0} and r["ABO"] == 1.0


def test_missing_instance_halves_recall():
    r = evaluate([pred("img1", A, 0, 0.9), pred("img2", C, 1, 0.7)], GT, CLASSES)
    # circle: one TP out of two GT -> AP 0.5; square: 1.0
    assert r["per_class"]["circle"]["0.5"] == 0.5 and r["mAP_r"]["0.5"] == 0.75
    assert r["ABO"] == pytest.approx((1 + 0 + 1) / 3)


def test_duplicates_are_false_positives_and_ranking_matters():
    # circle ranked: A (TP), A again (FP), B (TP): precision 1, 1/2, 2/3 at recall .5, .5, 1
    # all-point AP = 0.5 * 1 + 0.5 * 2/3
    r = evaluate([pred("img1", A, 0, 0.9), pred("img1", A, 0, 0.8), pred("img1", B, 0, 0.7)], GT, CLASSES)
    assert r["per_class"]["circle"]["0.5"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # the duplicate ranked last instead: precision 1, 1, 2/3 -> AP 1
    r = evaluate([pred("img1", A, 0, 0.9), pred("img1", B, 0, 0.8), pred("img1", A, 0, 0.7)], GT, CLASSES)
    assert r["per_class"]["circle"]["0.5"] == pytest.approx(1.0)


def test_wrong_class_counts_for_nothing():
    r = evaluate([pred("img2", C, 0, 0.9)], GT, CLASSES)  # a square called circle
    assert r["per_class"]["square"]["0.5"] == 0.0 and r["per_class"]["circle"]["0.5"] == 0.0
    assert r["ABO"] == pytest.approx(1 / 3)  # ABO is class-agnostic


def test_iou_thresholds():
    half = box(0, 0, 10, 5)  # IoU 0.5 with A
    r = evaluate([pred("img1", half, 0, 0.9)], {"img1": GT["img1"]}, CLASSES)
    assert r["per_class"]["circle"]["0.25"] == 0.5 and r["per_class"]["circle"]["0.5"] == 0.5
    assert r["per_class"]["circle"]["0.75"] == 0.0


def test_ignored_255_pixels_are_left_out_of_iou():
    ignore = box(0, 5, 10, 10)  # the right half of A is void
    gt = {"img1": (np.stack([A & ~ignore]), np.array([0]), ignore)}
    r = evaluate([pred("img1", A, 0, 0.9)], gt, CLASSES)  # covers the void too: not penalised
    assert r["mAP_r"]["0.75"] == 1.0 and r["ABO"] == 1.0


def test_iou_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    preds = rng.random((6, 30, 30)) > 0.6
    gts = rng.random((4, 30, 30)) > 0.5
    enc = lambda ms: [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in ms]  # noqa: E731
    theirs = mask_utils.iou(enc(preds), enc(gts), [0] * 4)
    np.testing.assert_allclose(mask_ious(preds, gts), theirs, rtol=1e-12)
    # and mAP^r built on them matches a pycocotools-IoU computation of the same greedy matching
    ap = average_precision([0.9, 0.8, 0.7], [True, False, True], 3)
    assert ap == pytest.approx((1 / 3) * 1 + (1 / 3) * (2 / 3))


def test_mismatches_are_named():
    with pytest.raises(EvaluationError, match="'img9'"):
        evaluate([pred("img9", A, 0, 0.9)], GT, CLASSES)
    bad = pred("img1", A, 0, 0.9)
    bad["category_name"] = "aeroplane"
    with pytest.raises(EvaluationError, match="class lists differ"):
        evaluate([bad], GT, CLASSES)
    small = pred("img1", box(0, 0, 5, 5, size=10), 0, 0.9)
    with pytest.raises(EvaluationError, match="ground truth is 20x20"):
        evaluate([small], GT, CLASSES)


def test_cli_on_synthetic_ground_truth(tmp_path):
    from iam_train.data.synthetic import SynthConfig, generate
    from iam_train.data.voc import VOCLayout

    data = generate(tmp_path / "d", SynthConfig(images=4, size=64, seed=2, val_fraction=0.5), progress=False)
    voc = VOCLayout(data)
    preds = []
    for image_id in voc.image_ids("val", segmentation=True):
        inst = voc.instances(image_id)
        preds += [pred(image_id, m, 0, 1.0) | {"category_id": int(c) + 1, "category_name": voc.classes[c]}
                  for m, c in zip(inst.masks, inst.classes)]
    (tmp_path / "p.json").write_text(json.dumps(preds))
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "p.json"), "--data", str(data), "--split", "val", "--out", str(out)])
    assert exit.value.code == 0
    report = json.loads(out.read_text())
    assert report["mAP_r"] == {"0.25": 1.0, "0.5": 1.0, "0.75": 1.0} and report["ABO"] == 1.0


def test_confidences_rank_as_peak_values():
    """iam-infer's score is sigmoid(peak value), rounded: large peaks all round to 1.0, and the
    raw peak value then decides; the mAP^r is the one ranking by peak value gives (issue 19)."""
    from iam_runtime.segmenter import confidence

    # circle: FP at peak 40, TP at 38, FP at 36, TP at 20: by peak value AP = (1/2 + 2/4) / 2
    rows = [(box(0, 0, 3, 3), 40.0), (A, 38.0), (box(15, 0, 18, 3), 36.0), (B, 20.0)]
    by_peak = evaluate([pred("img1", m, 0, v) for m, v in rows], GT, CLASSES)
    as_run = [pred("img1", m, 0, round(confidence(v), 6)) | {"peak_value": v} for m, v in rows]
    assert {p["score"] for p in as_run} == {1.0}
    assert evaluate(as_run, GT, CLASSES)["per_class"] == by_peak["per_class"]
    assert by_peak["per_class"]["circle"]["0.5"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert confidence(-800.0) == 0.0 and confidence(0.0) == 0.5 and confidence(800.0) == 1.0


def test_predictions_named_by_path_are_matched_by_their_stem():
    """iam-infer over a list file names images data/JPEGImages/<id>; over the folder, <id>."""
    named = [pred("data/JPEGImages/img1", A, 0, 0.9) | {"file_name": "data/JPEGImages/img1.jpg"},
             pred("data/JPEGImages/img1", B, 0, 0.8), pred("x/y", C, 1, 0.7) | {"file_name": "x/img2.png"}]
    assert evaluate(named, GT, CLASSES)["mAP_r"]["0.5"] == 1.0
    with pytest.raises(EvaluationError, match="'a/img1' and 'b/img1' are both of dataset image 'img1'"):
        evaluate([pred("a/img1", A, 0, 0.9), pred("b/img1", B, 0, 0.8)], GT, CLASSES)
    with pytest.raises(EvaluationError, match="'elsewhere/img9', which is not in the evaluated split"):
        evaluate([pred("elsewhere/img9", A, 0, 0.9)], GT, CLASSES)
