"""Run configurations: dataclasses with the reference defaults, read from YAML, overridden by
CLI flags, and saved resolved in the run directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from iam_runtime.files import atomic_write_text

T = TypeVar("T")


@dataclass
class PRMTrainConfig:
    """Classification/peak network (docs/method.md, section 1; reference recipe)."""

    data: str = ""
    split: str = "train"
    val_split: str | None = None
    backbone: str = "resnet50"
    weights: str | None = None  # None, "imagenet" or a local file
    image_size: int = 448
    epochs: int = 50
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.01
    scheduler: str = "none"  # "none" (reference) or "cosine"
    flip: float = 0.5
    win_size: int = 3
    threshold_mode: str = "median"
    upsample_factor: int = 8
    bn_recalibration_batches: int = 50  # precise BN after each epoch (0: off)
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only


@dataclass
class FillingTrainConfig:
    """Instance extent filling network (docs/method.md, section 3; reference recipe)."""

    data: str = ""
    split: str = "train"
    val_split: str | None = None  # needs SegmentationObject ground truth: best.pt by instance IoU
    prm: str = ""  # PRM run directory or checkpoint file
    epochs: int = 20
    batch_size: int = 4
    lr: float = 0.01
    optimizer: str = "rmsprop"  # reference: RMSprop
    channels: int = 16
    kernel_size: int = 3
    hidden: int = 64
    steps: int = 112
    align_corners: bool = True  # feature pyramid upsampling (the reference's: True)
    max_peaks_per_image: int = 8
    max_proposals: int = 100
    min_area: float = 2e-5
    max_area: float = 0.85
    balance: float = 0.1
    contour_width: int = 5
    top_k: int = 5
    duplicate_iou: float = 0.8
    bn_recalibration_batches: int = 50  # precise BN after each epoch (0: off)
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    amp: bool = True


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Defaults <- YAML file <- overrides (None values are ignored). Unknown keys are errors."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} options: {', '.join(unknown)}")
    return cls(**values)


def save_config(config: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
