"""``iam-eval``: instance segmentation metrics of the field on VOC-layout ground truth (docs/method.md, section 5).

* mAP^r at mask IoU thresholds (0.25, 0.5, 0.75 by default), as in the SDS evaluation that the
  PRM and IAM papers use: per class, predictions of all images ranked by score; each is a true
  positive when its mask IoU with a not yet matched ground-truth instance of its class in its
  image reaches the threshold (greedy, best IoU first), otherwise a false positive; AP is the
  VOC 2010+ all-point area under the interpolated precision/recall curve; mAP^r is the mean
  over classes that have ground-truth instances in the split.
* ABO (average best overlap): the mean over all ground-truth instances of the best IoU with any
  predicted mask of the same image (class-agnostic, as in the PRM paper).
* IoU ignores pixels labelled 255 (boundaries/void) in SegmentationObject.

Numpy + pycocotools only (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from iam_runtime.files import atomic_write_text
from iam_runtime.masks import mask_ious

PUBLISHED = {  # mAP^r@0.25, @0.5, @0.75, ABO on VOC 2012 val (docs/method.md, section 5)
    "PRM (CVPR 2018)": (44.3, 26.8, 9.0, 37.6),
    "IAM (CVPR 2019)": (45.9, 28.8, 11.9, 41.9),
}


class EvaluationError(ValueError):
    """Predictions that do not fit the dataset (named)."""


def average_precision(scores, positives, num_positives: int | None = None) -> float:
    """All-point (VOC 2010+) AP. scores: (N,); positives: (N,) bool; num_positives: the number
    of ground-truth items (default: positives.sum(), i.e. every positive is among the N)."""
    scores = np.asarray(scores, dtype=np.float64)
    hits = np.asarray(positives, dtype=bool)[np.argsort(-scores, kind="stable")]
    total = int(hits.sum()) if num_positives is None else int(num_positives)
    if total == 0:
        return float("nan")
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / total
    prec = np.concatenate(([0.0], precision, [0.0]))
    rec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 0.0]))
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    idx = np.flatnonzero(rec[1:] != rec[:-1])
    return float(((rec[idx + 1] - rec[idx]) * prec[idx + 1]).sum())


def _rank_key(p: dict) -> tuple[float, float]:
    """Predictions are ranked by score; iam-infer's scores are confidences (a sigmoid, which
    rounds to 1 for large peak values), so its raw peak value breaks their ties."""
    return float(p["score"]), float(p.get("peak_value", 0.0))


def _image_resolver(ground_truth: dict):
    """prediction -> the dataset image it is of. iam-infer names images by their path relative
    to its INPUT (``synth_000090`` from the JPEGImages folder, ``data/JPEGImages/synth_000090``
    from a list file one level up): the VOC id is the file's stem. Two different predicted
    images may not land on the same dataset image."""
    seen: dict[str, str] = {}

    def resolve(p: dict) -> str:
        given = str(p["image_id"])
        candidates = [given, Path(given).name, Path(str(p.get("file_name", given))).stem]
        image_id = next((c for c in candidates if c in ground_truth), None)
        if image_id is None:
            raise EvaluationError(f"prediction for image {given!r}, which is not in the evaluated split")
        if seen.setdefault(image_id, given) != given:
            raise EvaluationError(f"predictions for {seen[image_id]!r} and {given!r} are both of dataset image "
                                  f"{image_id!r}: evaluate one run over the split's images")
        return image_id

    return resolve


def evaluate(predictions: list[dict], ground_truth: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
             classes: list[str], thresholds=(0.25, 0.5, 0.75)) -> dict:
    """predictions: COCO-style results (image_id, category_id 1..C, score, segmentation RLE);
    ground_truth: image_id -> (masks (G, H, W) bool, classes (G,) 0-based, ignore (H, W) bool)."""
    from pycocotools import mask as mask_utils

    by_image: dict[str, list[dict]] = {}
    resolve = _image_resolver(ground_truth)
    for p in predictions:
        image_id = resolve(p)
        c = int(p["category_id"])
        if not 1 <= c <= len(classes):
            raise EvaluationError(f"category_id {c} of image {image_id!r} is outside 1..{len(classes)}")
        if "category_name" in p and p["category_name"] != classes[c - 1]:
            raise EvaluationError(f"class lists differ: category_id {c} is {p['category_name']!r} in the predictions "
                                  f"and {classes[c - 1]!r} in the dataset")
        by_image.setdefault(image_id, []).append(p)

    # per class: (score, image, [IoU with each same-class GT instance]) and GT counts
    records: dict[int, list[tuple[float, str, np.ndarray]]] = {c: [] for c in range(len(classes))}
    gt_count = np.zeros(len(classes), dtype=np.int64)
    best_overlaps = []
    for image_id, (gt_masks, gt_classes, ignore) in ground_truth.items():
        for c in gt_classes:
            gt_count[c] += 1
        preds = by_image.get(image_id, [])
        if preds:
            masks = np.stack([mask_utils.decode(p["segmentation"]).astype(bool) for p in preds])
            if masks.shape[1:] != ignore.shape:
                raise EvaluationError(f"masks of image {image_id!r} are {masks.shape[2]}x{masks.shape[1]}, "
                                      f"its ground truth is {ignore.shape[1]}x{ignore.shape[0]}")
            ious = mask_ious(masks, gt_masks, ignore) if len(gt_masks) else np.zeros((len(preds), 0))
        else:
            ious = np.zeros((0, len(gt_masks)))
        best_overlaps.extend(ious.max(axis=0) if len(preds) else np.zeros(len(gt_masks)))
        for k, p in enumerate(preds):
            c = int(p["category_id"]) - 1
            records[c].append((_rank_key(p), image_id, ious[k][gt_classes == c]))

    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(classes):
        if gt_count[c] == 0:
            continue
        ranked = sorted(records[c], key=lambda r: r[0], reverse=True)
        per_class[name] = {}
        for t in thresholds:
            taken: dict[str, set[int]] = {}
            hits = []
            for _, image_id, ious in ranked:
                used = taken.setdefault(image_id, set())
                order = [j for j in np.argsort(-ious, kind="stable") if j not in used and ious[j] >= t]
                if order:
                    used.add(int(order[0]))
                hits.append(bool(order))
            # ranked already: the AP's own ordering is given descending positions
            per_class[name][str(t)] = average_precision(-np.arange(len(ranked)), hits, int(gt_count[c])) \
                if ranked else 0.0
    mean = {str(t): float(np.mean([v[str(t)] for v in per_class.values()])) if per_class else float("nan")
            for t in thresholds}
    return {"mAP_r": mean, "ABO": float(np.mean(best_overlaps)) if best_overlaps else float("nan"),
            "per_class": per_class, "images": len(ground_truth), "predictions": len(predictions),
            "ground_truth_instances": int(gt_count.sum())}


def load_ground_truth(voc_dir: str | Path, split: str, image_ids: list[str] | None = None):
    from .data.voc import VOCLayout

    voc = VOCLayout(voc_dir)
    ids = image_ids or voc.image_ids(split, segmentation=True)
    return voc.classes, {i: (lambda x: (x.masks, x.classes, x.ignore))(voc.instances(i)) for i in ids}


def format_table(report: dict, thresholds=(0.25, 0.5, 0.75), name: str = "this model") -> str:
    head = "".join(f"{'mAP^r@' + str(t):>12}" for t in thresholds) + f"{'ABO':>8}"
    lines = [f"{'':<18}{head}"]
    for ref, values in PUBLISHED.items():
        lines.append(f"{ref:<18}" + "".join(f"{v:>12.1f}" for v in values[: len(thresholds)]) + f"{values[-1]:>8.1f}")
    lines.append(f"{name:<18}" + "".join(f"{100 * report['mAP_r'][str(t)]:>12.1f}" for t in thresholds)
                 + f"{100 * report['ABO']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--split", default="val", show_default=True, help="ImageSets/Segmentation/<split>.txt")
    @click.option("--iou", default="0.25,0.5,0.75", show_default=True)
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="report.json")
    def cli(predictions, data, split, iou, out):
        """Evaluate PREDICTIONS (iam-infer's predictions.json) on VOC-layout ground truth."""
        from .data.voc import DatasetError

        thresholds = tuple(float(t) for t in iou.split(","))
        try:
            preds = json.loads(predictions.read_text())
            if not isinstance(preds, list):
                raise EvaluationError(f"{predictions} is not a list of predictions")
            classes, gt = load_ground_truth(data, split)
            report = evaluate(preds, gt, list(classes), thresholds)
        except (EvaluationError, DatasetError, json.JSONDecodeError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
        report["split"], report["data"] = split, str(data)
        click.echo(format_table(report, thresholds))
        if out:
            atomic_write_text(out, json.dumps(report, indent=2))
            click.echo(f"wrote {out}")

    cli(args=argv)


if __name__ == "__main__":
    main()
