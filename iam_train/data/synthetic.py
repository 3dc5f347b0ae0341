"""A synthetic dataset in the exact VOC layout (docs/method.md, section 6), for tests and the demo.

Each image holds 1-4 instances of shape classes (circle, cross, square, triangle) with
class-typical but jittered colours and their own texture, on a textured background. Written:
JPEGImages, Annotations (XML), ImageSets/Main (per-class 1/-1/0 files and id lists),
ImageSets/Segmentation, SegmentationClass and SegmentationObject (VOC palette, 255 boundary
bands) and ImageProposals in the reference format: the true segments mixed with perturbed ones
(grown, shrunk, shifted, cut, merged) and background blobs, in random order, so that retrieving
the right proposal is a real choice. Deterministic for a given seed.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from iam_runtime.files import atomic_write
from iam_runtime.voc import IGNORE_LABEL, voc_palette

from .proposals import write_proposals

SYNTH_CLASSES: tuple[str, ...] = ("circle", "cross", "square", "triangle")
_CLASS_HUES = {"circle": 0.0, "cross": 0.33, "square": 0.6, "triangle": 0.15}


@dataclass
class SynthConfig:
    images: int = 64
    size: int = 128
    seed: int = 0
    max_instances: int = 4
    val_fraction: float = 0.25
    proposals_per_image: int = 40
    min_scale: float = 0.16  # instance diameter as a fraction of the image side
    max_scale: float = 0.36
    difficult_area: float = 0.012  # instances smaller than this fraction of the image are difficult


def _shape_polygon(name: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if name == "circle":
        points = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif name == "square":
        points = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif name == "triangle":
        points = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif name == "cross":
        a, b = 0.3, 1.0
        points = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(name)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in points]


def _polygon_mask(size: int, polygon: Iterable[tuple[float, float]]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(list(polygon), fill=1)
    return np.asarray(canvas, dtype=bool)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: (size, size, channels)."""
    coarse = rng.random((cells, cells, channels)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8).squeeze())
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32).reshape(size, size, channels) / 255


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _smooth_noise(rng, size, int(rng.integers(3, 7)), 3) * 0.5 + 0.25
    grain = rng.normal(0, 0.04, (size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.25)
    stripes = 0.06 * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))[..., None]
    gray = base.mean(axis=2, keepdims=True)
    return np.clip(0.6 * gray + 0.4 * base + grain + stripes, 0, 1)


def _paint_instance(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, name: str) -> None:
    hue = (_CLASS_HUES[name] + rng.normal(0, 0.04)) % 1.0
    colour = _hsv_to_rgb(hue, rng.uniform(0.5, 0.9), rng.uniform(0.55, 0.95))
    size = image.shape[0]
    texture = _smooth_noise(rng, size, int(rng.integers(6, 14)), 1) - 0.5
    yy = np.linspace(-0.5, 0.5, size, dtype=np.float32)[:, None, None]
    shaded = colour[None, None] * (1 + 0.35 * texture + 0.25 * yy * rng.choice([-1, 1]))
    image[mask] = np.clip(shaded + rng.normal(0, 0.03, image.shape), 0, 1)[mask]


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        p = np.pad(out, 1)
        out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def _erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    return ~_dilate(~mask, steps)


def _proposals(rng: np.random.Generator, masks: list[np.ndarray], count: int, size: int) -> list[np.ndarray]:
    """True segments, perturbed segments and background blobs, shuffled."""
    out = [m.copy() for m in masks]
    kinds = ["grow", "shrink", "shift", "cut", "merge", "blob", "box"]
    while len(out) < count:
        kind = rng.choice(kinds) if masks else rng.choice(["blob", "box"])
        if kind in ("grow", "shrink", "shift", "cut"):
            m = masks[int(rng.integers(len(masks)))]
            if kind == "grow":
                p = _dilate(m, int(rng.integers(2, 6)))
            elif kind == "shrink":
                p = _erode(m, int(rng.integers(2, 5)))
            elif kind == "shift":
                dy, dx = rng.integers(-size // 10, size // 10 + 1, size=2)
                p = np.roll(m, (int(dy), int(dx)), axis=(0, 1))
            else:
                yy, xx = np.mgrid[0:size, 0:size]
                cy, cx = np.argwhere(m).mean(axis=0)
                t = rng.uniform(0, math.pi)
                p = m & ((xx - cx) * math.cos(t) + (yy - cy) * math.sin(t) > 0)
        elif kind == "merge" and len(masks) > 1:
            i, j = rng.choice(len(masks), size=2, replace=False)
            p = _dilate(masks[i] | masks[j], 1)
        elif kind == "box":
            y0, x0 = rng.integers(0, size - 8, size=2)
            h, w = rng.integers(8, size // 2, size=2)
            p = np.zeros((size, size), dtype=bool)
            p[y0 : y0 + h, x0 : x0 + w] = True
        else:
            name = SYNTH_CLASSES[int(rng.integers(len(SYNTH_CLASSES)))]
            p = _polygon_mask(size, _shape_polygon(name, *rng.uniform(0, size, 2), rng.uniform(0.05, 0.2) * size, rng.uniform(0, 6.3)))
        if p.sum() >= 4:
            out.append(p)
    order = rng.permutation(len(out))
    return [out[i] for i in order]


@dataclass
class SynthImage:
    image: np.ndarray  # (H, W, 3) uint8
    objects: np.ndarray  # (H, W) uint8 SegmentationObject
    classes: np.ndarray  # (H, W) uint8 SegmentationClass
    instances: list[tuple[str, np.ndarray, bool]]  # (class name, mask, difficult)
    proposals: list[np.ndarray]


def render_image(config: SynthConfig, index: int) -> SynthImage:
    """Render image ``index`` of the dataset (independent of the other images)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, index]))
    size = config.size
    image = _background(rng, size)
    occupied = np.zeros((size, size), dtype=bool)
    instances: list[tuple[str, np.ndarray, bool]] = []
    for _ in range(int(rng.integers(1, config.max_instances + 1))):
        for _attempt in range(30):
            name = SYNTH_CLASSES[int(rng.integers(len(SYNTH_CLASSES)))]
            radius = rng.uniform(config.min_scale, config.max_scale) * size / 2
            cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
            mask = _polygon_mask(size, _shape_polygon(name, cx, cy, radius, rng.uniform(0, 2 * math.pi)))
            if mask.sum() >= 16 and not (_dilate(mask, 2) & occupied).any():
                break
        else:
            continue
        occupied |= mask
        _paint_instance(rng, image, mask, name)
        instances.append((name, mask, bool(mask.mean() < config.difficult_area)))
    pil = Image.fromarray((image * 255).round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    objects = np.zeros((size, size), dtype=np.uint8)
    classes = np.zeros((size, size), dtype=np.uint8)
    for k, (name, mask, _) in enumerate(instances, 1):
        objects[mask] = k
        classes[mask] = SYNTH_CLASSES.index(name) + 1
    boundary = np.zeros((size, size), dtype=bool)
    for _, mask, _ in instances:
        boundary |= _dilate(mask) & ~_erode(mask)
    objects[boundary] = IGNORE_LABEL
    classes[boundary] = IGNORE_LABEL
    proposals = _proposals(rng, [m for _, m, _ in instances], config.proposals_per_image, size)
    return SynthImage(np.asarray(pil), objects, classes, instances, proposals)


def _save_png(path: Path, array: np.ndarray, palette: bytes) -> None:
    img = Image.fromarray(array, mode="P")
    img.putpalette(palette)
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def _annotation_xml(image_id: str, size: int, instances: list[tuple[str, np.ndarray, bool]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "SYNTH"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    sz = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for name, mask, difficult in instances:
        ys, xs = np.nonzero(mask)
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", xs.min() + 1), ("ymin", ys.min() + 1), ("xmax", xs.max() + 1), ("ymax", ys.max() + 1)):
            ET.SubElement(box, tag).text = str(int(value))
    return ET.tostring(root)


def image_labels(instances: list[tuple[str, np.ndarray, bool]]) -> dict[str, int]:
    """VOC image-level labels: 1 if a non-difficult instance is present, 0 if only difficult
    ones are, -1 otherwise."""
    labels = dict.fromkeys(SYNTH_CLASSES, -1)
    for name, _, difficult in instances:
        labels[name] = max(labels[name], 0 if difficult else 1)
    return labels


def generate(out: str | Path, config: SynthConfig, progress: bool = True) -> Path:
    """Write the dataset under ``out`` (created; existing files are overwritten)."""
    from tqdm import tqdm

    root = Path(out)
    dirs = {name: root / name for name in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject", "ImageProposals")}
    main, seg = root / "ImageSets" / "Main", root / "ImageSets" / "Segmentation"
    for d in (*dirs.values(), main, seg):
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette().tobytes()
    n_val = int(round(config.images * config.val_fraction))
    ids = [f"synth_{i:06d}" for i in range(config.images)]
    splits = {"train": ids[: config.images - n_val], "val": ids[config.images - n_val :], "trainval": ids}
    labels: dict[str, dict[str, int]] = {}
    for index, image_id in enumerate(tqdm(ids, desc="synthetic images", disable=not progress)):
        item = render_image(config, index)
        with atomic_write(dirs["JPEGImages"] / f"{image_id}.jpg") as f:
            Image.fromarray(item.image).save(f, format="JPEG", quality=92)
        (dirs["Annotations"] / f"{image_id}.xml").write_bytes(_annotation_xml(image_id, config.size, item.instances))
        _save_png(dirs["SegmentationObject"] / f"{image_id}.png", item.objects, palette)
        _save_png(dirs["SegmentationClass"] / f"{image_id}.png", item.classes, palette)
        write_proposals(dirs["ImageProposals"] / f"{image_id}.json", item.proposals)
        labels[image_id] = image_labels(item.instances)
    for split, members in splits.items():
        text = "".join(f"{i}\n" for i in members)
        (main / f"{split}.txt").write_text(text)
        (seg / f"{split}.txt").write_text(text)
        for name in SYNTH_CLASSES:
            (main / f"{name}_{split}.txt").write_text("".join(f"{i} {labels[i][name]:2d}\n" for i in members))
    return root
