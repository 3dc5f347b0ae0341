"""The embedded default behind ``iam-infer --demo``: a synthetic VOC-layout dataset, a small
model trained on it and its bundle, built once (a few minutes on a laptop CPU) and cached under
the user cache directory. Nothing is downloaded. Building needs the training extras (torch);
running the cached bundle does not.

:class:`DemoRecipe` is what is built; docs/demo.md says what it reaches and how it was chosen."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .backends import default_cache_dir

DEMO_VERSION = "v3"  # v3: the segment graph outputs its crm (the shared forward)


@dataclass(frozen=True)
class DemoRecipe:
    """The demo's data, training and export settings (chosen by measurement: docs/demo.md)."""

    images: int = 240  # synthetic images, 25% of them held out (the demo's inputs)
    image_side: int = 128  # of the synthetic images
    backbone: str = "resnet18"
    input_size: int = 224  # network input
    prm_epochs: int = 12
    prm_batch_size: int = 16
    prm_lr: float = 0.01
    filling_epochs: int = 2
    filling_steps: int = 28
    filling_hidden: int = 16
    filling_peaks_per_image: int = 2
    class_threshold: float = 0.0  # exported semantics: a class is present at logit >= this
    peak_threshold: float = 0.0  # and a peak is used when its value is > this (confidence > 0.5)
    max_peaks: int = 32


def demo_dir() -> Path:
    return default_cache_dir() / f"demo-{DEMO_VERSION}"


def demo_images(root: Path | None = None) -> Path:
    """The held-out demo images: a list file of the synthetic val split."""
    root = root or demo_dir()
    listing = root / "demo-images.txt"
    if not listing.is_file():
        ids = (root / "data" / "ImageSets" / "Main" / "val.txt").read_text().split()
        listing.write_text("".join(f"data/JPEGImages/{i}.jpg\n" for i in ids))
    return listing


def ensure_demo_bundle(echo=print, root: Path | None = None, recipe: DemoRecipe = DemoRecipe()) -> Path:
    """The demo bundle under ``root`` (default: the user cache), built first if absent."""
    root = root or demo_dir()
    bundle = root / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    try:
        from iam_export.export_onnx import ExportOptions, export_bundle
        from iam_train.config import FillingTrainConfig, PRMTrainConfig
        from iam_train.data.synthetic import SynthConfig, generate
        from iam_train.train_filling import train_filling
        from iam_train.train_prm import train_prm
    except ImportError as exc:
        raise RuntimeError(
            f"building the demo trains a small model first, which needs the training extras ({exc}); "
            "install them with: pip install -e '.[all]'"
        ) from None
    import logging

    for noisy in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    r = recipe
    started = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - started:.0f} s]"  # noqa: E731
    echo(f"building the demo once under {root} (synthetic data, a small model, its bundle; no download)")
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    if not (data / "ImageSets" / "Main" / "val.txt").is_file():
        echo(f"{stamp()} 1/4 synthetic VOC-layout dataset")
        generate(data, SynthConfig(images=r.images, size=r.image_side, seed=0))
    prm, filling = root / "prm", root / "filling"
    for run in (prm, filling):  # an interrupted stage resumes from its last epoch; one with none restarts
        if run.exists() and not (run / "last.pt").is_file():
            shutil.rmtree(run)
    echo(f"{stamp()} 2/4 peak network ({r.backbone} at {r.input_size} px)")
    prm_config = PRMTrainConfig(data=str(data), split="train", val_split="val", backbone=r.backbone,
                                image_size=r.input_size, epochs=r.prm_epochs, batch_size=r.prm_batch_size,
                                lr=r.prm_lr, backbone_lr_mult=1.0, workers=0, bn_recalibration_batches=4)
    train_prm(prm_config, prm, resume=(prm / "last.pt").is_file())
    echo(f"{stamp()} 3/4 filling network")
    fill_config = FillingTrainConfig(data=str(data), split="train", prm=str(prm), epochs=r.filling_epochs,
                                     batch_size=4, lr=0.01, optimizer="adam", hidden=r.filling_hidden,
                                     steps=r.filling_steps, max_peaks_per_image=r.filling_peaks_per_image,
                                     workers=0, bn_recalibration_batches=10)
    train_filling(fill_config, filling, resume=(filling / "last.pt").is_file())
    echo(f"{stamp()} 4/4 exporting the bundle")
    export_bundle(prm, filling, bundle, ExportOptions(max_peaks=r.max_peaks, class_threshold=r.class_threshold,
                                                      peak_threshold=r.peak_threshold, force=True),
                  log=lambda *_: None)
    echo(f"{stamp()} demo built")
    return bundle
