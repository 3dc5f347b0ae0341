"""The embedded default behind ``iam-infer --demo``: a synthetic VOC-layout dataset, a small
model trained on it and its bundle, built once (a few minutes on a laptop CPU) and cached under
the user cache directory. Nothing is downloaded. Building needs the training extras (torch);
running the cached bundle does not."""

from __future__ import annotations

import shutil
from pathlib import Path

from .backends import default_cache_dir

DEMO_VERSION = "v1"


def demo_dir() -> Path:
    return default_cache_dir() / f"demo-{DEMO_VERSION}"


def demo_images() -> Path:
    """The held-out demo images: a list file of the synthetic val split."""
    root = demo_dir()
    listing = root / "demo-images.txt"
    if not listing.is_file():
        ids = (root / "data" / "ImageSets" / "Main" / "val.txt").read_text().split()
        listing.write_text("".join(f"data/JPEGImages/{i}.jpg\n" for i in ids))
    return listing


def ensure_demo_bundle(echo=print, root: Path | None = None) -> Path:
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
    echo(f"building the demo once under {root} (synthetic data, a small model, its bundle; no download)")
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    if not (data / "ImageSets" / "Main" / "val.txt").is_file():
        echo("1/4 synthetic VOC-layout dataset")
        generate(data, SynthConfig(images=120, size=128, seed=0))
    prm, filling = root / "prm", root / "filling"
    for run in (prm, filling):  # an interrupted stage resumes from its last epoch; one with none restarts
        if run.exists() and not (run / "last.pt").is_file():
            shutil.rmtree(run)
    echo("2/4 peak network (resnet18 at 224 px)")
    prm_config = PRMTrainConfig(data=str(data), split="train", val_split="val", backbone="resnet18", image_size=224,
                                epochs=6, batch_size=16, backbone_lr_mult=1.0, workers=0, bn_recalibration_batches=4)
    train_prm(prm_config, prm, resume=(prm / "last.pt").is_file())
    echo("3/4 filling network")
    fill_config = FillingTrainConfig(data=str(data), split="train", prm=str(prm), epochs=3, batch_size=4, lr=0.01,
                                     optimizer="adam", hidden=16, steps=28, max_peaks_per_image=2, workers=0,
                                     bn_recalibration_batches=10)
    train_filling(fill_config, filling, resume=(filling / "last.pt").is_file())
    echo("4/4 exporting the bundle")
    export_bundle(prm, filling, bundle, ExportOptions(max_peaks=32, force=True), log=lambda *_: None)
    return bundle
