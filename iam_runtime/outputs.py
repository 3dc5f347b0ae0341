"""Writing results: instance and class label PNGs (VOC palette, input size), overlay JPEGs and
COCO-style records (RLE via pycocotools; score: a confidence in [0, 1], the raw peak value and
class score beside it). Every file is written to a temporary name and renamed,
so an interrupted run never leaves a file that looks complete."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .files import atomic_write, atomic_write_bytes
from .overlays import overlay
from .segmenter import Instance
from .voc import IGNORE_LABEL, voc_palette

_PALETTE = voc_palette()


def _save_image(path: Path, image: Image.Image, **kw) -> None:
    with atomic_write(path) as f:
        image.save(f, **kw)


def label_maps(instances: list[Instance], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (1..N, in score order; a pixel goes to the best-scoring instance) and class
    labels (class index + 1, as VOC's SegmentationClass), both (H, W) uint8."""
    inst = np.zeros(size, dtype=np.uint8)
    cls = np.zeros(size, dtype=np.uint8)
    for k, ins in reversed(list(enumerate(instances[: IGNORE_LABEL - 1], 1))):
        inst[ins.mask] = k
        cls[ins.mask] = ins.class_index + 1
    return inst, cls


def save_label_png(path: Path, labels: np.ndarray) -> None:
    img = Image.fromarray(labels, mode="P")
    img.putpalette(_PALETTE.tobytes())
    _save_image(path, img, format="PNG")


def coco_records(instances: list[Instance], image_id: str, file_name: str, classes: list[str]) -> list[dict]:
    from pycocotools import mask as mask_utils

    records = []
    for ins in instances:
        rle = mask_utils.encode(np.asfortranarray(ins.mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        records.append({
            "image_id": image_id, "file_name": file_name, "category_id": ins.class_index + 1,
            "category_name": classes[ins.class_index], "score": round(ins.score, 6),
            "peak_value": round(float(ins.peak_value), 6), "class_score": round(float(ins.class_score), 6),
            "segmentation": rle,
            "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)], "area": int(ins.mask.sum()),
            "peak": [int(ins.peak[0]), int(ins.peak[1])],
        })
    return records


@dataclass
class OutputPaths:
    instances: Path
    classes: Path
    overlay: Path
    record: Path  # per-image JSON; written last, it marks the image complete


def output_paths(out_dir: Path, stem: str) -> OutputPaths:
    return OutputPaths(out_dir / "instances" / f"{stem}.png", out_dir / "classes" / f"{stem}.png",
                       out_dir / "overlays" / f"{stem}.jpg", out_dir / "records" / f"{stem}.json")


def write_image_outputs(paths: OutputPaths, rgb: np.ndarray, instances: list[Instance], classes: list[str],
                        image_id: str, file_name: str, save: set[str]) -> list[dict]:
    size = rgb.shape[:2]
    if "masks" in save:
        inst, cls = label_maps(instances, size)
        save_label_png(paths.instances, inst)
        save_label_png(paths.classes, cls)
    if "overlays" in save:
        _save_image(paths.overlay, overlay(rgb, instances), format="JPEG", quality=90)
    records = coco_records(instances, image_id, file_name, classes)
    record = {"image_id": image_id, "file_name": file_name, "height": size[0], "width": size[1],
              "instances": records, "saved": sorted(save)}
    atomic_write_bytes(paths.record, json.dumps(record).encode())
    return records


def is_complete(paths: OutputPaths, save: set[str]) -> bool:
    """An image's outputs are complete when its record exists and names the same outputs."""
    if not paths.record.is_file():
        return False
    try:
        record = json.loads(paths.record.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not save <= set(record.get("saved", [])):
        return False
    need = ([paths.instances, paths.classes] if "masks" in save else []) + ([paths.overlay] if "overlays" in save else [])
    return all(p.is_file() for p in need)
